"""Scale-out on torch.distributed: the device mesh, FSDP2, expert parallelism (docs/PARALLELISM.md)."""
