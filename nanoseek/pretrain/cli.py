"""`nanoseek pretrain`: a thin front-end to `nanoseek.pretrain.trainer`.

    nanoseek pretrain --config configs/small-v3.toml --out runs/small-v3
    nanoseek pretrain --config configs/tiny.toml --set optim.lr=1e-3 --set balance.bias_update_speed=0 --out runs/x
    nanoseek pretrain --out runs/small-v3 --resume          # continues from the last checkpoint
    nanoseek pretrain --config configs/small-v3.toml --show-config
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanoseek.pretrain.config import PretrainConfig
from nanoseek.pretrain.trainer import TrainingError, pretrain
from nanoseek.train.checkpoint import resume_hint


def _pretrain(args: argparse.Namespace) -> None:

    if args.keys:
        print(PretrainConfig.describe())
        return
    config = args.config
    out = Path(args.out) if args.out else Path("runs") / (Path(config).stem if config else "pretrain")
    if config is None and args.resume and (out / "config.toml").is_file():
        config = out / "config.toml"
    overrides = list(args.set or [])
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    cfg = PretrainConfig.load(config, overrides)
    if args.show_config:
        print(cfg.to_toml(), end="")
        return

    args.interrupted = lambda: resume_hint("pretrain", out, args.argv)
    try:
        summary = pretrain(cfg, out, resume=args.resume)
    except TrainingError as e:
        print(f"nanoseek pretrain: training stopped: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    parts = [f"{summary['steps']} steps", f"{summary['tokens']:,} tokens"]
    if summary.get("loss") is not None:
        parts.append(f"loss {summary['loss']:.4f}")
    if "val_bpb" in summary:
        parts += [f"val loss {summary['val_loss']:.4f}", f"val bits/byte {summary['val_bpb']:.4f}"]
    print(f"pretrain: {', '.join(parts)}; model in {summary['model_dir']}, metrics in {summary['metrics']}")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `nanoseek pretrain`."""
    p = subparsers.add_parser(
        "pretrain", help="pretrain a DeepSeek-style model (MLA, DeepSeekMoE, MTP, load balancing)",
        description="Pretrain a DeepSeek-style model from a TOML run config. Writes DIR/metrics.jsonl, "
                    "DIR/checkpoints/ (resumable), DIR/model/ (HF layout + tokenizer) and DIR/config.toml. "
                    "Without [data] dataset, a tokenizer and token shards are built from [data] sources "
                    "(default: Python's standard library) and cached.",
        epilog="Run `nanoseek pretrain --keys` for every config key with its type, default and meaning.")
    p.add_argument("--config", metavar="FILE", help="run config (TOML); defaults apply to keys it leaves out")
    p.add_argument("--out", metavar="DIR", help="run directory (default runs/<config name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from DIR's last checkpoint (starts fresh when there is none); "
                        "without --config, DIR/config.toml is used")
    p.add_argument("--seed", type=int, default=None, help="seed for initialization and data order (train.seed)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=3e-4 --set model.overrides.n_routed_experts=64; "
                        "repeatable")
    p.add_argument("--show-config", action="store_true", help="print the resolved config as TOML and exit")
    p.add_argument("--keys", action="store_true", help="list every config key with its documentation and exit")
    p.set_defaults(func=_pretrain)
