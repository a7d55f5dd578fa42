"""Training: loops, optimizer and schedules (schedules.py), balance updates, checkpoints; SFT, DPO, GRPO, distillation."""
