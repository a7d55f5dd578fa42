"""The process group and the DeviceMesh of a run, from its `[parallel]` section.

All ranks are data-parallel: dp_replicate x dp_shard = world size (HSDP when dp_replicate > 1). Expert
parallelism is carved from dp_shard, as torchtitan and Megatron do: dp_shard = efsdp x ep, where the ep
ranks of a group are neighbours (rank r's group is r // ep), each holding n_routed_experts / ep experts,
and the efsdp ranks hold the same experts and shard them further. One world mesh
(dp_replicate, dp_shard), with dp_shard unflattened into (efsdp, ep), gives every sub-mesh: dp_shard (with
dp_replicate: HSDP) for the dense parameters, ep for the all-to-all, (dp_replicate,) efsdp for the
experts' FSDP.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from nanoseek.config import ModelConfig
from nanoseek.parallel.pipeline import LOOPED, V_SHAPED, split_layers, stages_per_rank


def env_world_size() -> int:
    """Ranks of this job: the initialized group's size, torchrun's WORLD_SIZE, or 1."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device, timeout_s: float) -> None:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA) when there is more than one rank and no group
    yet; a collective that waits longer than `timeout_s` for a rank fails the job instead of hanging."""
    if dist.is_initialized() or env_world_size() == 1:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def main_first(fn):
    """fn() on rank 0, then on the other ranks: what rank 0 builds once (a dataset, a tokenizer) the others
    then find and reuse. In one process, just fn()."""
    if rank():
        barrier()
    result = fn()
    if not rank():
        barrier()
    return result


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank ([obj] in one process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@dataclass(frozen=True)
class ParallelDims:
    """A validated layout: pp pipeline ranks x (dp_replicate x dp_shard) data-parallel ranks, ep of those per
    expert-parallel group."""

    dp_replicate: int = 1
    dp_shard: int = 1
    ep: int = 1
    pp: int = 1
    pp_schedule: str = "1f1b"
    microbatches: int = 1
    pp_layers: tuple[int, ...] = ()

    @classmethod
    def resolve(cls, section, world_size: int, model: ModelConfig | None = None) -> ParallelDims:
        """From a `[parallel]` section (dp_shard 0 = the rest of the world), checked against the world size
        and the model; every impossible layout fails with the fields at fault."""
        R, S, ep, pp = section.dp_replicate, section.dp_shard, section.ep, section.pp
        if world_size % pp:
            raise ValueError(f"parallel.pp = {pp} does not divide the world size {world_size}")
        dp_world = world_size // pp
        if dp_world % R:
            raise ValueError(f"parallel.dp_replicate = {R} does not divide the {dp_world} data-parallel ranks "
                             f"(world size {world_size} / pp {pp})")
        S = S or dp_world // R
        if pp * R * S != world_size:
            raise ValueError(f"parallel.pp x dp_replicate x dp_shard = {pp} x {R} x {S} = {pp * R * S} ranks, but "
                             f"the job has {world_size} (torchrun --nproc-per-node x nodes); set dp_shard = 0 to "
                             "use them all")
        if S % ep:
            raise ValueError(f"parallel.ep = {ep} must divide parallel.dp_shard = {S}: expert-parallel groups are "
                             "carved from the sharded data-parallel ranks")
        n_stages = pp * stages_per_rank(section.pp_schedule)
        microbatches = section.microbatches or n_stages
        if pp > 1 and section.pp_schedule in V_SHAPED + LOOPED and microbatches < n_stages:
            raise ValueError(f"parallel.microbatches = {microbatches} must be at least the {n_stages} stages of "
                             f"{section.pp_schedule} with pp = {pp}")
        if model is not None and pp > 1:
            split_layers(model.num_hidden_layers, n_stages, list(section.pp_layers))
            if model.tie_word_embeddings and section.pp_schedule not in V_SHAPED:
                raise ValueError(f"a model with tie_word_embeddings needs its embedding and head on one rank: use "
                                 f"a V-shaped parallel.pp_schedule ({', '.join(V_SHAPED)}), not {section.pp_schedule}")
        if model is not None and ep > 1:
            if not model.n_routed_experts:
                raise ValueError(f"parallel.ep = {ep} needs a model with routed experts (n_routed_experts = 0)")
            if model.n_routed_experts % ep:
                raise ValueError(f"parallel.ep = {ep} must divide the model's n_routed_experts = "
                                 f"{model.n_routed_experts}")
        uses_devices = model is not None and model.n_routed_experts and (
            model.topk_devices is not None or model.device_aux_alpha or model.comm_aux_alpha)
        if world_size > 1 and uses_devices and model.ep_size != ep:
            # (one process simulates ep_size devices; with ranks, the devices are the ep ranks)
            raise ValueError(f"the model's ep_size = {model.ep_size} (the devices of its device-limited routing "
                             f"and device/communication balance losses) must equal parallel.ep = {ep} on "
                             f"{world_size} ranks; set model.overrides.ep_size = {ep} or parallel.ep = {model.ep_size}")
        return cls(R, S, ep, pp, section.pp_schedule, microbatches, tuple(section.pp_layers))

    @property
    def dp_world(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_world

    @property
    def efsdp(self) -> int:
        return self.dp_shard // self.ep

    @property
    def n_stages(self) -> int:
        return self.pp * stages_per_rank(self.pp_schedule)

    def build_meshes(self, device_type: str) -> Meshes:
        world = init_device_mesh(device_type, (self.pp, self.dp_replicate, self.dp_shard),
                                 mesh_dim_names=("pp", "dp_replicate", "dp_shard"))
        dp = world["dp_replicate", "dp_shard"]
        dense = dp if self.dp_replicate > 1 else world["dp_shard"]
        flat = dp._flatten("dp") if self.dp_replicate > 1 else dense
        pp = world["pp"] if self.pp > 1 else None
        if self.ep == 1:
            return Meshes(dense, None, None, flat, pp)
        full = dp._unflatten("dp_shard", (self.efsdp, self.ep), ("efsdp", "ep"))
        experts = full["dp_replicate", "efsdp"] if self.dp_replicate > 1 else full["efsdp"]
        return Meshes(dense, full["ep"], experts, flat, pp)

    def __str__(self) -> str:
        parts = [f"pp={self.pp} ({self.pp_schedule}, {self.microbatches} micro-batches)"] if self.pp > 1 else []
        if self.dp_replicate > 1:
            parts.append(f"dp_replicate={self.dp_replicate}")
        parts.append(f"dp_shard={self.dp_shard}")
        if self.ep > 1:
            parts.append(f"ep={self.ep}")
        return " x ".join(parts)


@dataclass(frozen=True)
class Meshes:
    dense: DeviceMesh
    """FSDP2's mesh for everything but the routed experts (1-D dp_shard, or 2-D for HSDP)."""
    ep: DeviceMesh | None
    """The expert-parallel group (all-to-all); None without expert parallelism."""
    experts: DeviceMesh | None
    """FSDP2's mesh for the routed experts: the ranks that hold the same experts."""
    dp: DeviceMesh | None = None
    """All data-parallel ranks of this pipeline position, flattened (metrics, expert load)."""
    pp: DeviceMesh | None = None
    """The pipeline ranks of this rank's data-parallel position; None without pipeline parallelism."""
