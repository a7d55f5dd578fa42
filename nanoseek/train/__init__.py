"""The training-loop core shared by pretraining and every post-training method.

config.py (typed TOML configs, `--set`, `--keys`, the sections every run shares), loop.py (the loop:
device, autocast, accumulation, clipping, the spike guard and rollback, checkpoint and resume, metrics,
progress), optim.py (AdamW groups, AdamW with BF16 moments, clipping), schedules.py (LR, batch ramp, λ and γ schedules),
checkpoint.py (atomic resumable checkpoints), metrics.py (metrics.jsonl, MFU).
"""
