"""Resumable training checkpoints and the exported model, written atomically.

    DIR/checkpoints/step-00000100/
        model/                 config.json + model.safetensors (HF layout; fp32 master weights and the
                               aux-loss-free router biases, which are model buffers)
        optimizer.pt           AdamW state dict (tensors, numbers, names: loads with weights_only=True)
        rng.safetensors        torch RNG states
        trainer_state.json     step, tokens seen, data-loader position, LR-schedule position, loss
                               statistics, parameter names, the resolved run config
    DIR/model/                 the latest model + tokenizer: `from_pretrained` and transformers load it

Each checkpoint is built in a temporary directory beside its final name and renamed into place, so a
run killed at any moment leaves only whole checkpoints; `keep_last` prunes the oldest.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nanoseek.interop.hf import (
    CheckpointError,
    check_state_dict,
    from_hf_state_dict,
    read_checkpoint,
    save_pretrained,
)

FORMAT = "nanoseek-train-checkpoint"
VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))
             and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def open_run_dir(out_dir: str | os.PathLike, resume: bool) -> tuple[Path, Path | None]:
    """Create the run directory; return it and the checkpoint to resume from (None for a fresh run).

    A fresh run refuses a directory that already holds checkpoints, so nothing is overwritten by accident."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    ckpt = latest_checkpoint(out)
    if ckpt is not None and not resume:
        raise ValueError(f"{out} already holds checkpoints ({ckpt.name}); pass --resume to continue that run "
                         "or choose another --out")
    return out, ckpt if resume else None


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename tmp to final; an existing final is moved aside first and removed after."""
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, keep_last: int = 2) -> Path:
    """Write DIR/checkpoints/step-{step:08d} atomically and keep only the newest `keep_last`."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_pretrained(model, tmp / "model")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, tmp / "rng.safetensors")
        meta = {"format": FORMAT, "version": VERSION, "step": step,
                "param_names": [n for n, _ in model.named_parameters()], **state}
        with open(tmp / "trainer_state.json", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_model_state(model: nn.Module, model_dir: str | os.PathLike) -> None:
    """Load an HF-layout checkpoint into an existing model in place (strict, names checked)."""
    tensors = read_checkpoint(model_dir, dtype=None)
    state = from_hf_state_dict(tensors, model.config)
    expected = model.state_dict()
    check_state_dict(state, expected, model_dir, against="the model")
    with torch.no_grad():
        for k, t in expected.items():
            t.copy_(state[k])


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore model, optimizer and RNG from a checkpoint directory; returns its trainer state."""
    path = Path(path)
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{state_file} not found: {path} is not a complete training checkpoint")
    state = json.loads(state_file.read_text(encoding="utf-8"))
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{state_file}: format {state.get('format')!r}, expected {FORMAT!r}")
    names = [n for n, _ in model.named_parameters()]
    if state["param_names"] != names:
        missing = sorted(set(names) - set(state["param_names"]))
        unexpected = sorted(set(state["param_names"]) - set(names))
        raise CheckpointError(f"{state_file}: the checkpoint was written for another model: missing parameters "
                              f"{missing[:6]}, unexpected parameters {unexpected[:6]}")
    load_model_state(model, path / "model")
    if optimizer is not None:
        opt_file = path / "optimizer.pt"
        if not opt_file.is_file():
            raise CheckpointError(f"{opt_file} not found")
        optimizer.load_state_dict(torch.load(opt_file, weights_only=True, map_location="cpu"))
    rng_file = path / "rng.safetensors"
    if rng_file.is_file():
        rng = load_file(rng_file)
        torch.set_rng_state(rng["torch_cpu"])
        if torch.cuda.is_available():
            cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
    return state


def export_model(model: nn.Module, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write the model (HF layout) and its tokenizer to out_dir, replacing it atomically."""
    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_pretrained(model, tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
