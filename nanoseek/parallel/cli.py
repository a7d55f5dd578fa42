"""`nanoseek plan`: the parallelism planner on paper (nanoseek.parallel.planner; V3 §3.2, Table 2).

    nanoseek plan --model deepseek-v3                                    # V3's layout on V3's cluster
    nanoseek plan --model deepseek-v3 --pp 8 --schedule zbv --ep 32 --zero 2 --microbatches 32
    nanoseek plan --model deepseek-v3 --search --gpus 1024
    nanoseek plan --model path/to/config.json --gpus 8 --gpus-per-node 8 --memory-gb 80 --search
    nanoseek plan --table2 --pp 16                                       # V3 Table 2's formulas
"""
from __future__ import annotations

import argparse

from nanoseek.parallel.planner import (
    PRECISIONS,
    SCHEDULES,
    ZERO_STAGES,
    Cluster,
    Layout,
    format_plan,
    format_search,
    format_table2,
    load_model,
    plan,
    search,
)


def _plan(args: argparse.Namespace) -> None:
    if args.table2:
        print(format_table2(args.pp, args.F, args.B, args.W, args.FB))
        return
    cfg = load_model(args.model)
    cluster = Cluster(gpus=args.gpus, gpus_per_node=args.gpus_per_node, memory_gb=args.memory_gb,
                      nvlink_gbps=args.nvlink_gbps, ib_gbps=args.ib_gbps, tflops=args.tflops)
    max_nodes = args.max_nodes or None
    if args.search:
        schedules = tuple(args.schedules.split(",")) if args.schedules else SCHEDULES
        bad = [s for s in schedules if s not in SCHEDULES]
        if bad:
            raise ValueError(f"--schedules has {', '.join(bad)}; allowed: {', '.join(SCHEDULES)}")
        plans = search(cfg, cluster, global_batch=args.global_batch, micro_batch_size=args.micro_batch_size,
                       seq_len=args.seq_len, max_nodes=max_nodes, schedules=schedules, precision=args.precision,
                       top=args.top)
        print(format_search(plans))
        print()
        print(format_plan(plans[0], cluster, args.precision))
        return
    microbatches = args.microbatches
    if microbatches is None:  # the global batch over the data-parallel ranks
        dp = args.gpus // args.pp if args.gpus % args.pp == 0 else 1
        microbatches = max(1, args.global_batch // (dp * args.micro_batch_size))
    layout = Layout(pp=args.pp, ep=args.ep, zero=args.zero, schedule=args.schedule,
                    microbatches=microbatches, micro_batch_size=args.micro_batch_size,
                    seq_len=args.seq_len, max_nodes=max_nodes)
    print(format_plan(plan(cfg, cluster, layout, args.precision), cluster, args.precision))


def register(sub) -> None:
    c, lay = Cluster(), Layout()
    p = sub.add_parser("plan", help="parallelism planner: memory, communication and bubble per GPU (on paper)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deepseek-v3", help="preset name or config.json / model directory")
    p.add_argument("--gpus", type=int, default=c.gpus)
    p.add_argument("--gpus-per-node", type=int, default=c.gpus_per_node)
    p.add_argument("--memory-gb", type=float, default=c.memory_gb, help="memory per GPU (GB)")
    p.add_argument("--nvlink-gbps", type=float, default=c.nvlink_gbps, help="intra-node GB/s per GPU")
    p.add_argument("--ib-gbps", type=float, default=c.ib_gbps, help="inter-node GB/s per GPU")
    p.add_argument("--tflops", type=float, default=c.tflops, help="achieved TFLOP/s per GPU for step times")
    p.add_argument("--pp", type=int, default=lay.pp, help="pipeline ranks")
    p.add_argument("--schedule", choices=SCHEDULES, default=lay.schedule,
                   help="pipeline schedule (zb1p and dualpipe: the paper's, on paper only)")
    p.add_argument("--ep", type=int, default=lay.ep, help="expert-parallel ranks (inside the data-parallel ranks)")
    p.add_argument("--zero", type=int, choices=ZERO_STAGES, default=lay.zero, help="ZeRO stage (3 = FSDP)")
    p.add_argument("--global-batch", type=int, default=15360, help="sequences per step (V3: 15360)")
    p.add_argument("--microbatches", type=int, default=None,
                   help="per pipeline and step (default: global batch / (dp x micro-batch size))")
    p.add_argument("--micro-batch-size", type=int, default=lay.micro_batch_size, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=int, default=lay.seq_len)
    p.add_argument("--max-nodes", type=int, default=lay.max_nodes,
                   help="M: nodes a token's experts may span (node-limited routing; 0 = no limit)")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="v3")
    p.add_argument("--search", action="store_true", help="rank the layouts that fit by estimated step time")
    p.add_argument("--schedules", default=None, help="comma-separated schedules the search tries (default: all)")
    p.add_argument("--top", type=int, default=10, help="layouts the search prints")
    p.add_argument("--table2", action="store_true", help="print V3 Table 2's formulas at --pp and F, B, W, F&B")
    p.add_argument("--F", type=float, default=1.0, help="forward chunk time (--table2)")
    p.add_argument("--B", type=float, default=2.0, help="full backward chunk time (--table2)")
    p.add_argument("--W", type=float, default=1.0, help="weight-backward chunk time (--table2)")
    p.add_argument("--FB", type=float, default=None, help="overlapped forward+backward time (--table2; default F+B)")
    p.set_defaults(func=_plan)
