def shard_experts(moe, mesh):
    raise NotImplementedError  # placeholder until wt-ep merges
