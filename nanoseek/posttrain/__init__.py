"""Post-training (DeepSeekMath §4, DeepSeek-R1 §2-3): config.py (PostConfig), trainer.py (policy, sequence
batches, evaluation, the post-training base on the shared loop), sft.py, dpo.py, grpo.py (+ policy_losses.py),
rejection.py, distill.py, cli.py (`nanoseek sft | dpo | grpo | distill | rejection-sample`).
"""
