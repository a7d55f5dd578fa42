"""Streaming checkpoint loading: peak memory while loading is about the loaded model's own size (issue 16's
acceptance, at small scale; `benchmarks/load_memory.py` at its defaults measures ≥ 2 GB checkpoints)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_peak_memory_of_loading_is_about_the_checkpoint_size(tmp_path):
    """A generated FP8 checkpoint (~100 MB, 5 shards) loaded with keep_fp8 and a bf16 one, each in a fresh
    process: peak resident memory while loading ≤ 1.3x the checkpoint's size."""
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "load_memory.py"), "--preset", "small-v3",
         "--set", "hidden_size=512", "--set", "moe_intermediate_size=256", "--set", "n_routed_experts=64",
         "--set", "num_nextn_predict_layers=0", "--size-gb", "0.1", "--shard-mb", "25", "--new-tokens", "0",
         "--dir", str(tmp_path), "--json", str(out)], capture_output=True, text=True, env=env, timeout=300,
        check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    for kind in ("fp8", "bf16"):
        r = results[kind]
        assert r["checkpoint_bytes"] > 1e8 and r["shards"] >= 4, r
        assert r["ratio"] <= 1.3, r
    assert results["fp8"]["keep_fp8"] and results["fp8"]["parameters"] > 1e8
    assert list(tmp_path.iterdir()) == [out]  # the checkpoints are deleted
