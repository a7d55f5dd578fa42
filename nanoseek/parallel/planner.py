"""The parallelism planner, on paper (DeepSeek-V3 §3.2, Table 2; docs/PARALLELISM.md "The planner").

Given a model, a cluster and a layout (ZeRO data parallelism, expert parallelism, pipeline parallelism
with a schedule), it estimates per-GPU memory, communication per step by kind and the pipeline bubble,
and searches the layouts that fit. Bubble and memory multipliers are V3 Table 2's, exactly:

    1F1B      bubble (PP−1)(F+B)          parameters 1x  activations PP
    ZB1P      bubble (PP−1)(F+B−2W)       parameters 1x  activations PP
    DualPipe  bubble (PP/2−1)(F&B+B−3W)   parameters 2x  activations PP+1

F: a forward chunk, B: a full backward chunk (input + weight gradients), W: the weight-gradient part
of B, F&B: a forward and a backward chunk overlapped. PP is the number of pipeline stages a chunk is
1/PP of (for DualPipeV on n ranks, PP = 2n stages). `pipeline_order` and `simulate_bubble` read the
per-rank action orders of torch.distributed.pipelining's own schedules and count the bubble they
run, which tests/test_planner.py compares with these formulas.

Everything except `pipeline_order` is arithmetic on plain numbers; figures are estimates unless
the paper states them.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import types
from collections import defaultdict
from dataclasses import dataclass

from torch.distributed.pipelining import schedules as torch_schedules

from nanoseek.config import ModelConfig
from nanoseek.scaling import count_params, training_flops_per_token

# Schedules the planner knows; the first five are torch.distributed.pipelining's (what training runs),
# zb1p and dualpipe are the paper's (Table 2) and are planned on paper only.
TORCH_SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zbv", "dualpipev")
SCHEDULES = TORCH_SCHEDULES + ("zb1p", "dualpipe")
ZERO_STAGES = (1, 2, 3)
GB = 1e9
GIB = 2**30


@dataclass(frozen=True)
class Formula:
    """A symbolic formula (V3 Table 2's notation) and its value for the numbers given."""

    text: str
    value: float

    def __str__(self) -> str:
        return f"{self.text} = {self.value:g}"


# ---------------------------------------------------------------------------------------------- Table 2
def _fb(F: float, B: float, FB: float | None) -> float:
    # Without overlap a device runs the pair one after the other; overlap (DualPipe) hides communication.
    return F + B if FB is None else FB


def bubble(schedule: str, PP: int, F: float = 1.0, B: float = 2.0, W: float = 1.0, FB: float | None = None,
           microbatches: int | None = None) -> Formula:
    """Pipeline bubble per device in chunk times (V3 Table 2 for 1f1b, zb1p, dualpipe).

    PP counts stages (chunks per model): pipeline ranks for gpipe / 1f1b / zb1p / dualpipe, and the
    V-shaped schedules fold 2 stages on each of PP/2 ranks (zbv, dualpipev), interleaved-1f1b 2
    chunks per rank. Defaults: F = W = 1, B = 2 (input + weight gradients each cost a forward).
    """
    _check_schedule(schedule)
    if schedule in ("gpipe", "1f1b"):
        return Formula("(PP−1)(F+B)", (PP - 1) * (F + B))
    if schedule == "interleaved-1f1b":  # 2 chunks per rank: the 1F1B bubble in chunks half the size
        return Formula("(PP/2−1)(F+B)", (PP / 2 - 1) * (F + B))
    if schedule == "zb1p":
        return Formula("(PP−1)(F+B−2W)", (PP - 1) * (F + B - 2 * W))
    if schedule == "zbv":
        return Formula("(PP/2−1)(F+B−2W)", (PP / 2 - 1) * (F + B - 2 * W))
    return Formula("(PP/2−1)(F&B+B−3W)", (PP / 2 - 1) * (_fb(F, B, FB) + B - 3 * W))


def parameter_multiplier(schedule: str) -> Formula:
    """Parameters per device in units of one chunk's (V3 Table 2: DualPipe keeps two copies)."""
    _check_schedule(schedule)
    return Formula("2x", 2) if schedule in ("dualpipe", "dualpipev", "zbv", "interleaved-1f1b") else Formula("1x", 1)


def activation_multiplier(schedule: str, PP: int, microbatches: int | None = None) -> Formula:
    """Micro-batches' chunk activations held at once by the busiest device (V3 Table 2 for 1F1B,
    ZB1P, DualPipe; the rest counted from torch's orders: gpipe keeps all m, interleaved-1f1b warms up
    3PP/2−1 chunks of half size)."""
    _check_schedule(schedule)
    if schedule == "gpipe":
        if microbatches is None:
            raise ValueError("gpipe keeps every micro-batch's activations: give microbatches")
        return Formula("m", microbatches)
    if schedule == "interleaved-1f1b":
        return Formula("3PP/2−1", 3 * PP // 2 - 1)
    if schedule in ("dualpipe", "dualpipev"):
        return Formula("PP+1", PP + 1)
    return Formula("PP", PP)


def table2(PP: int, F: float = 1.0, B: float = 2.0, W: float = 1.0, FB: float | None = None) -> list[tuple]:
    """V3 Table 2: (method, bubble, parameters, activations) for 1F1B, ZB1P and DualPipe."""
    return [(name, bubble(s, PP, F, B, W, FB), parameter_multiplier(s), activation_multiplier(s, PP))
            for name, s in (("1F1B", "1f1b"), ("ZB1P", "zb1p"), ("DualPipe", "dualpipe"))]


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}; allowed: {', '.join(SCHEDULES)}")


def stages_per_rank(schedule: str) -> int:
    """Model chunks on each pipeline rank (2 for the V-shaped and interleaved schedules and DualPipe)."""
    return 2 if schedule in ("interleaved-1f1b", "zbv", "dualpipe", "dualpipev") else 1


def num_stages(schedule: str, pp: int) -> int:
    """Stages the model is cut into: DualPipe keeps 2 copies of pp stages; the others cut pp x chunks."""
    return pp if schedule == "dualpipe" else pp * stages_per_rank(schedule)


# ------------------------------------------------------------------------ torch's schedules, simulated
def _stub_stage(pp: int, stages: int, index: int):
    # What the schedules' constructors read from a stage; building the action order needs no process group.
    return types.SimpleNamespace(num_stages=stages, group_size=pp, group_rank=0, submod=None, stage_index=index,
                                 stage_index_to_group_rank=None)


def pipeline_order(schedule: str, pp: int, microbatches: int) -> dict[int, list]:
    """The per-rank action order (`_Action`s; None = idle) torch.distributed.pipelining builds for
    `schedule` on pp ranks.

    torch 2.13's Schedule1F1B order (informational: its runtime loop does not read it) numbers the last
    rank's forwards from 1 instead of 0; its micro-batches are renumbered in order, as the loop runs them.
    """
    if schedule not in TORCH_SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not a torch.distributed.pipelining schedule; "
                         f"allowed: {', '.join(TORCH_SCHEDULES)}")
    S = torch_schedules
    if schedule in ("gpipe", "1f1b"):
        cls = S.ScheduleGPipe if schedule == "gpipe" else S.Schedule1F1B
        order = cls(_stub_stage(pp, pp, 0), microbatches).pipeline_order
    else:
        cls = {"interleaved-1f1b": S.ScheduleInterleaved1F1B, "zbv": S.ScheduleZBVZeroBubble,
               "dualpipev": S.ScheduleDualPipeV}[schedule]
        local = (0, pp) if schedule == "interleaved-1f1b" else (0, 2 * pp - 1)
        order = cls([_stub_stage(pp, 2 * pp, i) for i in local], microbatches).pipeline_order
    return {r: _renumber(order[r]) if schedule == "1f1b" else order[r] for r in sorted(order)}


def _renumber(actions: list) -> list:
    seen: dict[tuple, int] = defaultdict(int)

    def fix(a):
        if a is None or not a.is_compute_op:
            return a
        key = (a.stage_index, a.computation_type)
        seen[key] += 1
        return a._replace(microbatch_index=seen[key] - 1)

    return [fix(a) for a in actions]


def simulate_bubble(order: dict[int, list], F: float = 1.0, I: float = 1.0, W: float = 1.0,
                    FB: float | None = None) -> dict[int, float]:
    """Idle time of each rank running `order` with dependencies respected and free communication.

    A forward needs the previous stage's forward; an input backward (I, or full B = I + W) needs its
    own forward and the next stage's backward; W needs its I; an overlapped F&B pair (DualPipe) needs
    both and takes FB (default F + B). Bubble = makespan − the rank's busy time.
    """
    dur = {"F": F, "I": I, "W": W, "B": I + W}
    fb = _fb(F, I + W, FB)
    queues = {r: [a for a in acts if a is not None and a.is_compute_op] for r, acts in order.items()}
    last = max(s.stage_index for acts in queues.values() for a in acts for s in (a.sub_actions or (a,)))

    def key(a):
        t = a.computation_type.value
        return ("B" if t in ("B", "I") else t, a.stage_index, a.microbatch_index)

    def deps(a):
        t, s, mb = a.computation_type.value, a.stage_index, a.microbatch_index
        if t == "F":
            return [("F", s - 1, mb)] if s > 0 else []
        if t == "W":
            return [("B", s, mb)]
        return [("F", s, mb)] + ([("B", s + 1, mb)] if s < last else [])

    done: dict[tuple, float] = {}
    clock = dict.fromkeys(queues, 0.0)
    busy = dict.fromkeys(queues, 0.0)
    pos = dict.fromkeys(queues, 0)
    while any(pos[r] < len(q) for r, q in queues.items()):
        progress = False
        for r, q in queues.items():
            while pos[r] < len(q):
                a = q[pos[r]]
                subs = a.sub_actions or (a,)
                needs = [d for s in subs for d in deps(s)]
                if not all(d in done for d in needs):
                    break
                took = fb if a.sub_actions else dur[a.computation_type.value]
                clock[r] = max([clock[r]] + [done[d] for d in needs]) + took
                busy[r] += took
                for s in subs:
                    done[key(s)] = clock[r]
                pos[r] += 1
                progress = True
        if not progress:
            stuck = {r: q[pos[r]] for r, q in queues.items() if pos[r] < len(q)}
            raise RuntimeError(f"the schedule deadlocks: waiting actions {stuck}")
    span = max(clock.values())
    return {r: span - busy[r] for r in queues}


def peak_activations(actions: list) -> int:
    """Most micro-batch chunks whose activations a rank holds at once (a forward's are freed by its
    full backward B, or by W after a split I)."""
    held = peak = 0
    for a in actions:
        if a is None or not a.is_compute_op:
            continue
        for s in a.sub_actions or (a,):
            held += {"F": 1, "B": -1, "W": -1}.get(s.computation_type.value, 0)
            peak = max(peak, held)
    return peak


# ------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Cluster:
    """GPUs and links; defaults are DeepSeek-V3's (§3.1): 2048 H800, 8 per node, NVLink 160, IB 50 GB/s."""

    gpus: int = 2048
    gpus_per_node: int = 8
    memory_gb: float = 80.0
    nvlink_gbps: float = 160.0  # GB/s per GPU within a node
    ib_gbps: float = 50.0  # GB/s per GPU between nodes
    tflops: float = 400.0  # achieved dense TFLOP/s per GPU assumed for step times (an assumption, not H800 peak)


@dataclass(frozen=True)
class Precision:
    """Bytes per element. "v3" (§3.3): BF16 working weights, FP32 master weights and gradients, BF16
    AdamW moments, BF16 activations and combine, FP8 dispatch. "fp32": everything FP32, no master copy."""

    name: str
    weight: int
    master: int
    grad: int
    moments: int  # both AdamW moments together
    activation: int
    dispatch: int
    combine: int


PRECISIONS = {"v3": Precision("v3", 2, 4, 4, 4, 2, 1, 2), "fp32": Precision("fp32", 4, 0, 4, 8, 4, 4, 4)}


@dataclass(frozen=True)
class Layout:
    """How the GPUs are used: dp = gpus / pp data-parallel ranks per stage with ZeRO `zero` (1: optimizer
    state sharded, 2: + gradients, 3: + parameters = FSDP), ep experts' ranks inside dp, pp pipeline ranks."""

    pp: int = 16
    ep: int = 64
    zero: int = 1
    schedule: str = "dualpipe"
    microbatches: int = 32
    micro_batch_size: int = 1
    seq_len: int = 4096
    max_nodes: int | None = 4  # node-limited routing: a token's experts on at most M nodes (V3: 4)


@dataclass(frozen=True)
class Plan:
    """The estimate for one layout; bytes per GPU, seconds per step."""

    layout: Layout
    dp: int
    memory: dict  # parameters, gradients, optimizer, activations, total (bytes)
    comm: dict  # kind -> (bytes per GPU per step, link)
    bubble: Formula  # in chunk times
    bubble_fraction: float
    compute_s: float
    comm_exposed_s: float
    step_s: float
    fits: bool


def load_model(model: str) -> ModelConfig:
    """A preset name (nanoseek.config.PRESETS) or a config.json path / model directory."""
    if model.endswith(".json"):
        return ModelConfig.from_json(model)
    if "/" in model or model.startswith("."):
        return ModelConfig.from_pretrained(model)
    return ModelConfig.preset(model)


@dataclass(frozen=True)
class _Sizes:
    """Parameter and per-token counts of a model, split where parallelism cuts it."""

    layers: int
    moe_layers: int
    experts: int
    topk: int
    hidden: int
    embedding: int  # on the first stage
    head: int  # final norm, LM head and the MTP modules but their routed experts: on the last stage
    head_experts: float  # the MTP modules' routed experts, per expert
    dense_per_layer: float  # attention, dense MLP / shared experts, router, norms: mean over layers
    expert_per_layer: float  # one routed expert's weights
    fwd_flops_per_token_layer: float  # mean forward FLOPs of a layer (attention over seq_len included)
    fwd_flops_head: float  # LM head + MTP forward FLOPs per token
    act_bytes_per_token_layer: dict  # bytes cached for backward per token and layer, by precision


def _sizes(cfg: ModelConfig, seq_len: int) -> _Sizes:
    shape = dataclasses.asdict(cfg)
    counts = count_params(**shape)
    flops = training_flops_per_token(seq_len, **shape)
    L, d = cfg.num_hidden_layers, cfg.hidden_size
    E = cfg.n_routed_experts or 0
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(L))
    expert = 3 * d * (cfg.moe_intermediate_size or 0)
    head = 0 if cfg.tie_word_embeddings else counts.embedding
    # An MTP module is one more decoder layer plus its projection and norms (V3 §2.2), counted by adding a layer.
    mtp_layer = count_params(**{**shape, "num_hidden_layers": L + 1}).total - counts.total
    mtp_experts = cfg.num_nextn_predict_layers * (E * expert if cfg.is_moe_layer(L) else 0)
    mtp = cfg.num_nextn_predict_layers * (mtp_layer + 2 * d * d + 3 * d) - mtp_experts
    layer_params = counts.total - counts.embedding - head - d
    dense = layer_params - moe_layers * E * expert
    return _Sizes(layers=L, moe_layers=moe_layers, experts=E, topk=cfg.num_experts_per_tok or 0, hidden=d,
                  embedding=counts.embedding, head=head + d + mtp, head_experts=mtp_experts / max(E, 1),
                  dense_per_layer=dense / L, expert_per_layer=moe_layers * E * expert / L / max(E, 1),
                  fwd_flops_per_token_layer=flops.non_embedding / 3 / L,
                  fwd_flops_head=(flops.lm_head + flops.mtp) / 3,
                  act_bytes_per_token_layer={name: _activation_bytes(cfg, name) for name in PRECISIONS})


def _activation_bytes(cfg: ModelConfig, precision: str) -> float:
    """Bytes per token and layer kept for backward (an estimate). Flash attention keeps no S x S scores.

    "fp32": every matmul's and norm's input, attention's output and log-sum-exp, and per routed or
    shared expert its input, gate, up and SwiGLU output, in FP32. "v3" (§3.2.3, §3.3): RMSNorm outputs
    and MLA's up-projections are recomputed (only the latents are kept), linear inputs are cached in
    FP8, SwiGLU's output is recomputed from its FP8-cached inputs; norm inputs and attention's output
    stay BF16.
    """
    d, h = cfg.hidden_size, cfg.num_attention_heads
    if cfg.is_mla:
        v = cfg.v_head_dim
        latents = (cfg.q_lora_rank or 0) + cfg.kv_lora_rank + cfg.qk_rope_head_dim
        full_qkv = h * cfg.qk_head_dim + h * (cfg.qk_nope_head_dim + v)
    else:
        v = cfg.head_dim or d // h
        latents, full_qkv = 0, (h + 2 * cfg.num_key_value_heads) * v
    if cfg.is_moe:
        experts, width = cfg.num_experts_per_tok + (cfg.n_shared_experts or 0), cfg.moe_intermediate_size
    else:
        experts, width = 1, cfg.intermediate_size
    if precision == "v3":
        norms, attn = 2 * d * 2, d + latents + h * v + 2 * h * v + 4 * h  # o_proj input FP8, output BF16, lse FP32
        return norms + attn + experts * (d + 2 * width)
    attn = 2 * d + latents + full_qkv + 2 * h * v + h
    return 4 * (attn + experts * (d + 3 * width))


def check_layout(cfg: ModelConfig, cluster: Cluster, layout: Layout) -> None:
    """Raise ValueError naming the field when the layout cannot run on the cluster."""
    lay = layout
    _check_schedule(lay.schedule)
    for name in ("pp", "ep", "microbatches", "micro_batch_size", "seq_len"):
        if getattr(lay, name) < 1:
            raise ValueError(f"{name}={getattr(lay, name)} must be >= 1")
    if lay.zero not in ZERO_STAGES:
        raise ValueError(f"zero={lay.zero}; allowed: {', '.join(map(str, ZERO_STAGES))}")
    if lay.schedule == "dualpipe" and lay.pp % 2:
        raise ValueError(f"pp={lay.pp} must be even for dualpipe (V3 §3.2.1)")
    if cluster.gpus % cluster.gpus_per_node:
        raise ValueError(f"gpus={cluster.gpus} is not a multiple of gpus_per_node={cluster.gpus_per_node}")
    if cluster.gpus % lay.pp:
        raise ValueError(f"pp={lay.pp} does not divide gpus={cluster.gpus}")
    dp = cluster.gpus // lay.pp
    E = cfg.n_routed_experts or 0
    if lay.ep > 1 and (not E or E % lay.ep):
        raise ValueError(f"ep={lay.ep} does not divide n_routed_experts={E}")
    if dp % lay.ep:
        raise ValueError(f"ep={lay.ep} does not divide the data-parallel ranks gpus/pp={dp}")
    stages = num_stages(lay.schedule, lay.pp)
    if stages > cfg.num_hidden_layers:
        raise ValueError(f"pp={lay.pp} with {lay.schedule} cuts {stages} stages from {cfg.num_hidden_layers} layers")
    if lay.schedule in ("dualpipe", "dualpipev") and lay.microbatches % 2:
        raise ValueError(f"microbatches={lay.microbatches} must be even for {lay.schedule} (V3 §3.2.1)")
    if lay.schedule == "dualpipev" and lay.microbatches < stages:
        raise ValueError(f"microbatches={lay.microbatches} must be >= the {stages} stages of dualpipev on pp={lay.pp}")
    if lay.schedule in ("1f1b", "zb1p", "zbv", "interleaved-1f1b") and lay.microbatches < lay.pp:
        raise ValueError(f"microbatches={lay.microbatches} must be >= pp={lay.pp} to fill the {lay.schedule} pipeline")
    if lay.schedule == "interleaved-1f1b" and lay.microbatches % max(1, lay.microbatches // lay.pp):
        raise ValueError(f"microbatches={lay.microbatches} must be a multiple of microbatches // pp for interleaved-1f1b")
    if lay.max_nodes is not None and lay.max_nodes < 1:
        raise ValueError(f"max_nodes={lay.max_nodes} must be >= 1 (or None: no node limit)")


def plan(cfg: ModelConfig, cluster: Cluster = Cluster(), layout: Layout = Layout(),
         precision: str | Precision = "v3") -> Plan:
    """Memory, communication and bubble per GPU of `layout` for `cfg` on `cluster` (estimates)."""
    check_layout(cfg, cluster, layout)
    p = PRECISIONS[precision] if isinstance(precision, str) else precision
    lay, s = layout, _sizes(cfg, layout.seq_len)
    dp = cluster.gpus // lay.pp
    stages, chunks = num_stages(lay.schedule, lay.pp), stages_per_rank(lay.schedule)
    layers_chunk = math.ceil(s.layers / stages)  # the busiest stage of an even split
    # The busiest rank: its chunks' layers, plus the embedding and the head when one rank holds both ends
    # (V-shaped schedules and DualPipe put stage 0 and the last stage on rank 0).
    ends = s.embedding + s.head if chunks == 2 and lay.schedule != "interleaved-1f1b" or lay.pp == 1 \
        else max(s.embedding, s.head)
    dense = chunks * layers_chunk * s.dense_per_layer + ends
    # The MTP module's routed experts sit with the head, sharded like every layer's over ep.
    head_experts = s.head_experts if ends != s.embedding else 0
    expert = (chunks * layers_chunk * s.expert_per_layer + head_experts) * s.experts / lay.ep
    edp = dp // lay.ep  # ranks holding the same experts
    shard_d, shard_e = dp, edp
    params = dense * (p.weight / (shard_d if lay.zero == 3 else 1)) + expert * (p.weight / (shard_e if lay.zero == 3 else 1))
    grads = dense * p.grad / (shard_d if lay.zero >= 2 else 1) + expert * p.grad / (shard_e if lay.zero >= 2 else 1)
    optim = (p.master + p.moments) * (dense / shard_d + expert / shard_e)
    tokens_mb = lay.micro_batch_size * lay.seq_len
    held = activation_multiplier(lay.schedule, stages, lay.microbatches).value
    acts = held * layers_chunk * tokens_mb * s.act_bytes_per_token_layer[p.name]
    memory = {"parameters": params, "gradients": grads, "optimizer": optim, "activations": acts}
    memory["total"] = sum(memory.values())

    comm = _communication(s, cluster, lay, p, dp, edp, dense, expert, layers_chunk * chunks, tokens_mb)
    # Chunk times from FLOPs: W = F, B = 2F (weight and input gradients each cost a forward).
    flop_s = cluster.tflops * 1e12
    F = layers_chunk * tokens_mb * s.fwd_flops_per_token_layer / flop_s
    head_s = lay.microbatches * tokens_mb * 3 * s.fwd_flops_head / flop_s
    b = bubble(lay.schedule, stages, F=F, B=2 * F, W=F)
    # DualPipe sends each micro-batch down one of its two copies, and both copies' last stages hold a head.
    copies = 2 if lay.schedule == "dualpipe" else 1
    compute = lay.microbatches * chunks // copies * 3 * F + head_s / copies
    # DualPipe and DualPipeV hide the all-to-all under the overlapped chunk (V3 §3.2.1); ZeRO's collectives
    # and the pipeline's sends count as exposed (an upper estimate).
    hidden = ("dispatch+combine (IB)", "dispatch+combine (NVLink)") if lay.schedule.startswith("dualpipe") else ()
    exposed = sum(v / (_bw(cluster, link)) for k, (v, link) in comm.items() if k not in hidden)
    step = compute + b.value + exposed
    return Plan(layout=lay, dp=dp, memory=memory, comm=comm, bubble=b,
                bubble_fraction=b.value / (compute + b.value), compute_s=compute, comm_exposed_s=exposed,
                step_s=step, fits=memory["total"] <= cluster.memory_gb * GB)


def _bw(cluster: Cluster, link: str) -> float:
    return (cluster.nvlink_gbps if link == "NVLink" else cluster.ib_gbps) * GB


def _communication(s: _Sizes, cluster: Cluster, lay: Layout, p: Precision, dp: int, edp: int, dense: float,
                   expert: float, layers_rank: int, tokens_mb: int) -> dict:
    """Bytes each GPU sends per step, by kind, with the link they cross (upper bounds of a ring / a
    token's every destination on another node)."""
    g = cluster.gpus_per_node
    comm: dict[str, tuple[float, str]] = {}
    # ZeRO-1/2: reduce-scatter the gradients and all-gather the updated weights once per step;
    # ZeRO-3 (FSDP): all-gather the weights for forward and again for backward, reduce-scatter, every micro-batch.
    for name, n, count in (("dense", dp, dense), ("experts", edp, expert)):
        if n <= 1:
            continue
        ring = (n - 1) / n * count
        link = "NVLink" if _group_span(n, g, stride=lay.ep if name == "experts" else 1) <= 1 else "IB"
        if lay.zero == 3:
            comm[f"{name} all-gather"] = (2 * lay.microbatches * ring * p.weight, link)
            comm[f"{name} reduce-scatter"] = (lay.microbatches * ring * p.grad, link)
        else:
            comm[f"{name} all-gather"] = (ring * p.weight, link)
            comm[f"{name} reduce-scatter"] = (ring * p.grad, link)
    if lay.ep > 1 and s.moe_layers:
        moe_frac = s.moe_layers / s.layers
        tokens = lay.microbatches * tokens_mb * layers_rank * moe_frac  # token-layer visits on this rank
        nodes = math.ceil(lay.ep / g)
        remote = min(s.topk, nodes, lay.max_nodes or nodes)  # nodes a token's dispatch reaches over IB
        per_token = p.dispatch + p.combine
        # forward dispatch + combine, and their mirror images in backward
        if nodes > 1:
            comm["dispatch+combine (IB)"] = (2 * tokens * remote * s.hidden * per_token, "IB")
        local = min(s.topk, lay.ep)  # then NVLink forwards to each selected expert's GPU
        comm["dispatch+combine (NVLink)"] = (2 * tokens * local * s.hidden * per_token, "NVLink")
    if lay.pp > 1:
        sends = 2 * lay.microbatches * stages_per_rank(lay.schedule)  # activation forward, gradient back
        comm["pipeline send/recv"] = (sends * tokens_mb * s.hidden * p.activation, "IB")
    return comm


def _group_span(n: int, gpus_per_node: int, stride: int = 1) -> int:
    # A group's ranks are consecutive (or every stride-th): the nodes it spans.
    return max(1, math.ceil(n * stride / gpus_per_node))


def search(cfg: ModelConfig, cluster: Cluster = Cluster(), global_batch: int = 15360,
           micro_batch_size: int = 1, seq_len: int = 4096, max_nodes: int | None = 4,
           schedules: tuple[str, ...] = SCHEDULES, precision: str = "v3", top: int = 10) -> list[Plan]:
    """Layouts (pp, ep, ZeRO stage, schedule) that fit in memory, fastest estimated step first.

    Every layout trains the same global batch (sequences per step; V3's final 15360): each pipeline
    runs global_batch / (dp x micro_batch_size) micro-batches. Raises ValueError when none fits.
    """
    E = cfg.n_routed_experts or 0
    pps = [d for d in range(1, cluster.gpus + 1) if cluster.gpus % d == 0 and d <= cfg.num_hidden_layers]
    found, tried = [], 0
    for pp, schedule, zero in itertools.product(pps, schedules, ZERO_STAGES):
        dp = cluster.gpus // pp
        eps = [e for e in range(1, dp + 1) if dp % e == 0 and (e == 1 or (E and E % e == 0))]
        for ep in eps:
            if global_batch % (dp * micro_batch_size):
                continue
            m = global_batch // (dp * micro_batch_size)
            lay = Layout(pp=pp, ep=ep, zero=zero, schedule=schedule, microbatches=m,
                         micro_batch_size=micro_batch_size, seq_len=seq_len, max_nodes=max_nodes)
            try:
                pl = plan(cfg, cluster, lay, precision)
            except ValueError:
                continue
            tried += 1
            if pl.fits:
                found.append(pl)
    if not found:
        raise ValueError(f"no layout of {tried} tried fits in memory_gb={cluster.memory_gb:g} per GPU on "
                         f"{cluster.gpus} GPUs with global_batch={global_batch}; add GPUs or memory, or shorten "
                         "seq_len / micro_batch_size")
    found.sort(key=lambda pl: (pl.step_s, pl.memory["total"]))
    return found[:top]


# ------------------------------------------------------------------------------------------ printing
def format_plan(pl: Plan, cluster: Cluster, precision: str = "v3") -> str:
    lay = pl.layout
    stages = num_stages(lay.schedule, lay.pp)
    lines = [(f"layout: pp={lay.pp} ({lay.schedule}, {stages} stages, {lay.microbatches} micro-batches of "
              f"{lay.micro_batch_size} x {lay.seq_len}), ep={lay.ep}, dp={pl.dp} (ZeRO-{lay.zero}), "
              f"M={lay.max_nodes or 'off'} nodes per token; {cluster.gpus} GPUs, {cluster.gpus_per_node} per node"),
             f"precision: {_precision_note(precision)}",
             "memory per GPU (busiest rank, estimate):"]
    for k in ("parameters", "gradients", "optimizer", "activations", "total"):
        lines.append(f"  {k:<12} {pl.memory[k] / GIB:10.2f} GiB")
    lines.append(f"  {'fits':<12} {'yes' if pl.fits else 'NO'} (of {cluster.memory_gb:g} GB)")
    lines.append("communication per GPU per step (estimate):")
    for k, (v, link) in pl.comm.items():
        lines.append(f"  {k:<28} {v / GB:10.2f} GB over {link}")
    act = activation_multiplier(lay.schedule, stages, lay.microbatches)
    lines.append(f"pipeline: bubble {pl.bubble.text} = {bubble(lay.schedule, stages).value:g} F (F=W=1, B=2, "
                 f"F&B=F+B) = {pl.bubble.value * 1e3:.1f} ms "
                 f"({pl.bubble_fraction:.1%} of the step); parameters {parameter_multiplier(lay.schedule).text}, "
                 f"activations {act.text} = {act.value:g} chunks")
    lines.append(f"step time (estimate at {cluster.tflops:g} TFLOP/s per GPU): compute {pl.compute_s:.2f} s + "
                 f"bubble {pl.bubble.value:.2f} s + exposed communication {pl.comm_exposed_s:.2f} s = {pl.step_s:.2f} s")
    return "\n".join(lines)


def _precision_note(precision: str) -> str:
    if precision == "v3":
        return ("V3 (§3.3): BF16 weights for compute (GEMMs in FP8), FP32 master weights and gradients, BF16 AdamW "
                "moments, activations cached in FP8 with RMSNorm/MLA up-projection/SwiGLU recomputed, FP8 dispatch, BF16 combine")
    return "FP32 weights, gradients, AdamW moments and activations (no master copy)"


def format_table2(PP: int, F: float, B: float, W: float, FB: float | None) -> str:
    lines = [f"V3 Table 2 at PP={PP}, F={F:g}, B={B:g}, W={W:g}, F&B={_fb(F, B, FB):g}:",
             f"  {'method':<9} {'bubble':<32} {'parameters':<11} activations"]
    for name, bub, par, act in table2(PP, F, B, W, FB):
        lines.append(f"  {name:<9} {bub!s:<32} {par.text:<11} {act}")
    return "\n".join(lines)


def format_search(plans: list[Plan]) -> str:
    lines = ["layouts that fit, fastest estimated step first:",
             f"  {'pp':>4} {'schedule':<17} {'ep':>4} {'dp':>5} {'ZeRO':>4} {'m':>4} {'GiB/GPU':>8} {'bubble':>7} {'step s':>8}"]
    for pl in plans:
        lay = pl.layout
        lines.append(f"  {lay.pp:>4} {lay.schedule:<17} {lay.ep:>4} {pl.dp:>5} {lay.zero:>4} {lay.microbatches:>4} "
                     f"{pl.memory['total'] / GIB:8.1f} {pl.bubble_fraction:7.1%} {pl.step_s:8.2f}")
    return "\n".join(lines)
