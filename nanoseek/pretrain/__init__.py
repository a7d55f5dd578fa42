"""Pretraining (DeepSeek LLM §2.3, V2 §3.1, V3 §4): config.py (PretrainConfig), dataset.py (token shards
built or reused), losses.py (main + MTP cross-entropy), balance.py (aux-loss-free bias updates, token
dropping, MaxVio), trainer.py (the pretraining step on the shared loop), cli.py (`nanoseek pretrain`).

    from nanoseek.pretrain.config import PretrainConfig
    from nanoseek.pretrain.trainer import pretrain
    pretrain(PretrainConfig.load("configs/tiny.toml", ["train.steps=20"]), "runs/tiny")
"""
