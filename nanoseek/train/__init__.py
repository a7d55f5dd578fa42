"""Training: loops, optimizer and schedules (schedules.py), balance updates, checkpoints; SFT, DPO, GRPO, distillation.

Pretraining: config.py (RunConfig, TOML + --set), optim.py (AdamW groups, clipping), losses.py (main +
MTP cross-entropy), balance.py (aux-loss-free bias updates, token dropping, MaxVio), metrics.py
(metrics.jsonl, MFU), checkpoint.py (atomic resumable checkpoints), dataset.py (build/reuse token
shards), pretrain.py (the loop), cli.py (`nanoseek pretrain`).

    from nanoseek.train.config import load_run_config
    from nanoseek.train.pretrain import pretrain      # the submodule name: import the function from it
    pretrain(load_run_config("configs/tiny.toml", ["train.steps=20"]), "runs/tiny")
"""

__all__ = ["RunConfig", "Trainer", "load_run_config"]


def __getattr__(name):  # light import: torch-heavy modules load on first use
    if name in ("RunConfig", "load_run_config"):
        from nanoseek.train import config
        return getattr(config, name)
    if name == "Trainer":
        from nanoseek.train.pretrain import Trainer
        return Trainer
    raise AttributeError(f"module 'nanoseek.train' has no attribute {name!r}")
