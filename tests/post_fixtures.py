"""A bimodal arithmetic base for the post-training tests, built once per test session.

The base is the micro R1-Zero's (nanoseek.recipes.r1, stage "base") with a test-sized budget: a
tiny-v3 SFT'd on 30% correct <think> scratchpad traces and 70% dropped-carry answers in <answer> tags. Under
pytest-xdist every worker asks for it; the first builds it under a file lock in the session's shared
temporary directory and the others wait and reuse it.
"""
from __future__ import annotations

import json
from pathlib import Path

from filelock import FileLock

from nanoseek.posttrain.config import PostConfig

BASE_SETS = [
    "task.name=arithmetic", "data.styles={think=0.3, buggy=0.7}", "data.tag_bare=true",
    'model.overrides={num_nextn_predict_layers=0, rope_scaling="null", seq_aux_alpha=0.0}',
    "optim.lr=3e-3", "optim.beta2=0.95", "schedule.warmup_steps=20", "train.threads=1", "log.progress=false",
    "eval.examples=100", "eval.at_start=false", "eval.max_new_tokens=48",
]


def shared_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.getbasetemp()
    return root.parent if root.name.startswith("popen-gw") else root


def bimodal_base(tmp_path_factory, steps: int, batch_size: int) -> Path:
    """DIR/model of the session's bimodal base (built on first use)."""
    from nanoseek.posttrain.sft import sft

    root = shared_root(tmp_path_factory)
    out = root / f"nanoseek-bimodal-base-{steps}-{batch_size}"
    with FileLock(str(out) + ".lock"):
        if not (out / "summary.json").is_file():
            cfg = PostConfig.load(None, BASE_SETS + [f"train.steps={steps}", f"train.batch_size={batch_size}"])
            sft(cfg, out)
    return out


def summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())
