"""Apply a run's layout to a built model, as torchtitan's `parallelize` does; the model itself stays pure.

Order matters: expert parallelism first (the routed experts become DTensors sharded over the ep mesh and
the MoE's dispatcher an all-to-all one), then FSDP2 from the leaves up: the routed experts of each MoE
(over the ranks that hold the same experts), each decoder block (the MTP modules' too), then the root
(the embedding, the final norm, the head and the MTP projections, which the model calls piecewise).
Gradients of every parameter end up averaged over all data-parallel ranks: FSDP averages the dense ones
over dp_shard (and dp_replicate), and the experts', whose local gradient already sums the ep group's
tokens (the all-to-all's backward), are divided by all data-parallel ranks instead of their own mesh.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from nanoseek.model.transformer import DeepSeekForCausalLM
from nanoseek.parallel.expert import shard_experts
from nanoseek.parallel.mesh import Meshes, ParallelDims


def parallelize(model: DeepSeekForCausalLM, dims: ParallelDims, meshes: Meshes, bf16_params: bool = False,
                roots: list[nn.Module] | None = None) -> nn.Module:
    """Shard `model` in place over `meshes` (EP, then FSDP2 per block and root); returns it. `roots`: the
    modules whose forward runs the model (default the model; a pipeline rank's stages). Under a pipeline
    the parameters stay gathered from a micro-batch's forward to its backward (as torchtitan does): it saves
    an all-gather per micro-batch, and the split backward of ZBV / DualPipeV (input gradients, then weight
    gradients later) needs them (measured: resharded, the weight pass left the stages wrong gradients).

    `bf16_params` (GPU bf16 runs): FSDP2 gathers bf16 parameters and reduces gradients in fp32, while the
    sharded master weights stay fp32 (AdamW's moments: `optim.moments_dtype`)."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_params \
        else MixedPrecisionPolicy()
    reshard = roots is None
    if dims.ep > 1:
        for moe in model.moe_layers():
            shard_experts(moe, meshes.ep)
            fully_shard(moe.experts, mesh=meshes.experts, mp_policy=policy, reshard_after_forward=reshard)
            moe.experts.set_gradient_divide_factor(float(dims.dp_world))
            if dims.efsdp > 1:
                # sum, then divide (gloo has no PREMUL_SUM); not on a 1-rank mesh, where torch 2.13's FSDP
                # already divides while skipping the reduce-scatter and would divide twice
                moe.experts.set_force_sum_reduction_for_comms(True)
    for block in [*model.model.layers, *(m.block for m in model.mtp)]:
        if any(True for _ in block.parameters()):  # (not a pruned pipeline stage's placeholder)
            fully_shard(block, mesh=meshes.dense, mp_policy=policy, reshard_after_forward=reshard)
    for root in roots or [model]:
        fully_shard(root, mesh=meshes.dense, mp_policy=policy, reshard_after_forward=reshard)
    return model
