"""Training metrics: DIR/metrics.jsonl (one JSON object per step), TensorBoard when installed, and MFU.

MFU = tokens/s × training FLOPs per token / peak FLOP/s. FLOPs per token come from
`nanoseek.scaling.training_flops_per_token` (DeepSeek LLM's M extended to MLA/MoE/MTP: attention,
active experts, router, head, MTP). The peak is measured here, not taken from a datasheet: the
throughput of a large square matmul in the run's dtype on this machine, with the same threads.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from nanoseek.utils import atomic_write_text

_PEAK_CACHE: dict[tuple, float] = {}


def measure_matmul_peak(dtype: torch.dtype = torch.float32, n: int | None = None, seconds: float = 0.3,
                        device: str | torch.device = "cpu") -> float:
    """FLOP/s of an n×n×n matmul in `dtype` (best of a few timed runs); cached per (dtype, device, threads)."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    key = (dtype, n, device, torch.get_num_threads())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if key not in _PEAK_CACHE:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b  # warm up (allocations, AMX tile configuration, cuBLAS handles)
        sync()
        best, deadline = math.inf, time.perf_counter() + seconds
        while True:
            t = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t)
            if time.perf_counter() > deadline:
                break
        _PEAK_CACHE[key] = 2 * n**3 / best
    return _PEAK_CACHE[key]


def _clean(value):
    """JSON-safe: tensors to numbers, non-finite floats to None (JSON has no NaN)."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class MetricsLogger:
    """Appends records to DIR/metrics.jsonl (flushed per record) and scalars to TensorBoard if available."""

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(os.fspath(Path(run_dir) / "tensorboard"))
            except (ImportError, ModuleNotFoundError):
                self._tb = None

    def write(self, record: dict) -> None:
        record = _clean(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a killed run) is ignored."""
    records = []
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(run_dir: str | os.PathLike, last_step: int) -> None:
    """Keep only the records of steps <= last_step (a resumed run rewrites what came after)."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def max_violation(load_LE: torch.Tensor) -> torch.Tensor:
    """MaxVio per layer: (max load − mean load) / mean load, from loads [layers, E]."""
    load = load_LE.float()
    mean = load.mean(-1)
    return (load.amax(-1) - mean) / mean.clamp_min(1e-12)


def load_summary(load_LE: torch.Tensor) -> dict:
    """Per-layer summary of one step's expert load [layers, E]: MaxVio_batch and the least-loaded share."""
    vio = max_violation(load_LE)
    load = load_LE.float()
    return {
        "max_vio_batch": [round(v, 4) for v in vio.tolist()],
        "max_vio_batch_mean": float(vio.mean()),
        "expert_load_min": [round(v, 4) for v in (load.amin(-1) / load.mean(-1).clamp_min(1e-12)).tolist()],
    }
