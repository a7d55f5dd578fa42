"""Pipeline parallelism: the model cut into stages for `torch.distributed.pipelining` (V3 §3.2.1).

A stage is a contiguous run of decoder layers; the first also embeds the tokens, the last also holds the
final norm, the head and the MTP modules (V3 §2.2: they share the head with the main model). What crosses
a stage boundary is, per micro-batch, the hidden state, the token embeddings (the MTP modules of the last
stage combine them with the hidden state) and the running sum of the balance losses, so the gradient of
every stage's V3 sequence-wise / V2 balance loss flows back through the pipeline like the hidden state's;
each stage keeps the routings of its MoE layers for the aux-loss-free bias update.

Placement of stages on ranks (`stages_of_rank`): one per rank for GPipe and 1F1B; two per rank for the
looped (interleaved 1F1B: r and r + pp) and V-shaped schedules (ZBV, DualPipeV: r and 2·pp − 1 − r, so
rank 0 holds both the first and the last stage: the embedding and the head live together, as in
DeepSeek's DualPipe). `prune` drops from a rank's model what its stages do not hold, keeping the
parameter names of the whole model, so checkpoints and exports address the same tensors on any layout.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)

from nanoseek.model.moe import MoE, Routing
from nanoseek.model.transformer import DeepSeekForCausalLM

SCHEDULE_CLASSES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved-1f1b": ScheduleInterleaved1F1B,
                    "zbv": ScheduleZBVZeroBubble, "dualpipev": ScheduleDualPipeV}
SCHEDULES = tuple(SCHEDULE_CLASSES)
LOOPED = ("interleaved-1f1b",)
V_SHAPED = ("zbv", "dualpipev")


def stages_per_rank(schedule: str) -> int:
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.pp_schedule = {schedule!r} is invalid: allowed {', '.join(SCHEDULES)}")
    return 2 if schedule in LOOPED + V_SHAPED else 1


def stages_of_rank(rank: int, pp: int, schedule: str) -> list[int]:
    """The stage indices pipeline rank `rank` of `pp` holds, in the order the schedule expects."""
    if stages_per_rank(schedule) == 1:
        return [rank]
    return [rank, rank + pp] if schedule in LOOPED else [rank, 2 * pp - 1 - rank]


def split_layers(n_layers: int, n_stages: int, sizes: list[int] | None = None) -> list[range]:
    """The decoder layers of each stage: `sizes` (layers per stage) or an even split, earlier stages taking
    one more when it does not divide (the last stage also carries the head and the MTP modules)."""
    if sizes:
        if len(sizes) != n_stages or sum(sizes) != n_layers or min(sizes) < 0:
            raise ValueError(f"parallel.pp_layers = {sizes} must give each of the {n_stages} stages a number of "
                             f"layers, summing to the model's {n_layers}")
    else:
        if n_layers < n_stages:
            raise ValueError(f"{n_stages} pipeline stages need at least as many decoder layers; the model has "
                             f"{n_layers}")
        sizes = [n_layers // n_stages + (i < n_layers % n_stages) for i in range(n_stages)]
    starts = [sum(sizes[:i]) for i in range(n_stages)]
    return [range(s, s + n) for s, n in zip(starts, sizes)]


class Stage(nn.Module):
    """Stage `index` of `n_stages` of a model (its modules, shared, not copied). forward: the first stage takes
    input ids [B, T]; the others (h, emb, aux) from the stage before; the last returns (logits,
    *mtp_logits, aux), the others (h, emb, aux); aux [1] is the sum of the balance losses so far."""

    def __init__(self, model: DeepSeekForCausalLM, index: int, n_stages: int, layers: range):
        super().__init__()
        self.index, self.n_stages = index, n_stages
        self.first, self.last = index == 0, index == n_stages - 1
        self.embed_tokens = model.model.embed_tokens if self.first else None
        self.layers = nn.ModuleList(model.model.layers[i] for i in layers)
        self.norm = model.model.norm if self.last else None
        self.lm_head = model.lm_head if self.last else None
        self.mtp = model.mtp if self.last else nn.ModuleList()
        self.rotary = model.rotary
        self.use_mtp = True
        """Run the MTP modules (pretraining); off, the last stage returns (logits, aux) (post-training)."""
        self.routings: list[Routing] = []
        """The routing of each MoE layer this stage ran since the last `take_routings` (bias update)."""

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.first:
            emb = self.embed_tokens(inputs[0])
            h, aux = emb, emb.new_zeros(1)  # (1-D: the schedule concatenates each micro-batch's outputs)
        else:
            h, emb, aux = inputs
        S = h.shape[1]
        rope = self.rotary(torch.arange(S, device=h.device)[None])
        for layer in self.layers:
            h, stats = layer(h, rope)
            self._keep(stats)
            if stats is not None and stats.aux_loss is not None:
                aux = aux + stats.aux_loss
        if not self.last:
            return h, emb, aux
        h = self.norm(h)
        out = [self.lm_head(h)]
        for k, layer in enumerate(self.mtp if self.use_mtp else [], start=1):  # as DeepSeekForCausalLM._mtp
            n = S - k
            h, stats = layer(h[:, :n], emb[:, k:], tuple(t[:, :n] for t in rope))
            self._keep(stats)
            if stats is not None and stats.aux_loss is not None:
                aux = aux + stats.aux_loss
            out.append(self.lm_head(layer.shared_head.norm(h)))
        return (*out, aux)

    def moe_layers(self) -> list[MoE]:
        """The MoE layers this stage runs, in order."""
        blocks = [*self.layers, *(m.block for m in self.mtp if self.use_mtp)]
        return [b.mlp for b in blocks if isinstance(b.mlp, MoE)]

    def _keep(self, stats) -> None:
        if stats is not None:
            self.routings.append(stats.routing)

    def take_routings(self) -> list[Routing]:
        routings, self.routings = self.routings, []
        return routings


def build_stages(model: DeepSeekForCausalLM, indices: list[int], n_stages: int,
                 sizes: list[int] | None = None) -> list[Stage]:
    """The `Stage`s `indices` of a model cut into `n_stages`."""
    layers = split_layers(model.config.num_hidden_layers, n_stages, sizes)
    return [Stage(model, i, n_stages, layers[i]) for i in indices]


def prune(model: DeepSeekForCausalLM, stages: list[Stage]) -> DeepSeekForCausalLM:
    """Drop from `model`, in place, every module none of `stages` holds: layers become placeholders without
    parameters (the others keep their names), the embedding, norm, head and MTP modules go where no stage
    holds them."""
    kept = {id(m) for s in stages for m in s.modules()}
    layers = model.model.layers
    for i, layer in enumerate(layers):
        if id(layer) not in kept:
            layers[i] = nn.Identity()
    if not any(s.first for s in stages):
        model.model.embed_tokens = None
    if not any(s.last for s in stages):
        model.model.norm, model.lm_head, model.mtp = None, None, nn.ModuleList()
    return model


def moe_rows(model: DeepSeekForCausalLM) -> dict[int, int]:
    """id(MoE) -> its row in the whole model's expert load (`DeepSeekForCausalLM.moe_layers` order)."""
    return {id(m): row for row, m in enumerate(model.moe_layers())}


class Pipeline:
    """This rank's stages of a pipelined model and the schedule that runs them (torch.distributed.pipelining).

    Build it on the whole model (every rank builds the same; it prunes the model to this rank's stages), shard
    the pruned model (the FSDP roots are `stages`, whose forwards the schedule calls), then `build`. `loss_fn(outputs,
    target)` scores one micro-batch on the last stage; the schedule sums the micro-batches' gradients and
    divides them by their number, so a micro-batch's mean loss makes the step's mean."""

    def __init__(self, model: DeepSeekForCausalLM, pp_mesh: DeviceMesh, schedule: str, microbatches: int,
                 layers: list[int] | None = None, mtp: bool = True):
        pp, rank = pp_mesh.size(), pp_mesh.get_local_rank()
        self.n_stages = pp * stages_per_rank(schedule)
        indices = stages_of_rank(rank, pp, schedule)
        self.rows = moe_rows(model)
        self.n_moe = len(self.rows)
        self.stages = build_stages(model, indices, self.n_stages, layers)
        for stage in self.stages:
            stage.use_mtp = mtp
        prune(model, self.stages)
        self.indices, self.group = indices, pp_mesh.get_group()
        self.schedule_name, self.microbatches = schedule, microbatches
        self.first = any(s.first for s in self.stages)
        self.last = any(s.last for s in self.stages)
        self.schedule = None

    def build(self, device: torch.device, loss_fn: Callable) -> None:
        """The schedule over the (by now sharded) stages."""
        pipe = [PipelineStage(s, i, self.n_stages, device, group=self.group) for s, i in zip(self.stages, self.indices)]
        cls = SCHEDULE_CLASSES[self.schedule_name]
        self.schedule = cls(pipe if len(pipe) > 1 else pipe[0], self.microbatches, loss_fn=loss_fn)

    def step(self, inputs: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
        """Forward and backward of one batch on every pipeline rank; the micro-batches' losses
        on the rank of the last stage ([] elsewhere). `loss_fn` may be called once more on the first step (the
        schedule's shape inference): count on the returned losses, or on the last `microbatches` calls."""
        losses: list[torch.Tensor] = []
        self.schedule.step(*((inputs,) if self.first else ()), target=target if self.last else None, losses=losses)
        for stage in self.stages:
            # the schedule's first step also runs a stage forward of its own (shapes): keep the micro-batches'
            n = self.microbatches * len(stage.moe_layers())
            stage.routings = stage.routings[len(stage.routings) - n:]
        return losses

    def expert_load(self, n_experts: int) -> torch.Tensor:
        """[n_moe_layers, E] tokens per expert of this rank's MoE layers since the last call (rows of the whole
        model; the other stages' rows zero: sum over the pipeline ranks)."""
        load = torch.zeros(self.n_moe, n_experts)
        for stage in self.stages:
            moes = stage.moe_layers()
            for i, r in enumerate(stage.take_routings()):  # micro-batch by micro-batch, the layers in order
                load[self.rows[id(moes[i % len(moes)])]] += r.load.cpu()
        return load
