"""Resumable training checkpoints and the exported model, written atomically, on one rank or many.

    DIR/checkpoints/step-00000100/
        state/                 model + AdamW state through torch.distributed.checkpoint (DCP): each rank
                               writes its own shards (fp32 master weights, the aux-loss-free router biases,
                               which are model buffers, and the optimizer moments, all by parameter name),
                               so a checkpoint saved on 4 ranks loads on 2, on 1, or in a plain process
        rng-00000.safetensors  each rank's torch RNG states
        trainer_state.json     step, tokens seen, data-loader position, LR-schedule position, loss
                               statistics, parameter names, the layout, the resolved run config, and the
                               SHA-256 of every other file of the checkpoint and of its own content
    DIR/model/                 the latest model + tokenizer, gathered to rank 0 in the HF layout:
                               `from_pretrained` and transformers load it

Each checkpoint is built in a temporary directory beside its final name and renamed into place by rank 0
once every rank has written, so a run killed at any moment leaves only whole checkpoints; `keep_last`
prunes the oldest, and the next start removes the temporary directories a kill left behind. Resuming
verifies the checksums first and falls back to the newest intact checkpoint, with a warning naming what is
wrong with the newer ones (`resume_latest`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from nanoseek.interop.hf import CheckpointError, save_pretrained, transformers_mismatch
from nanoseek.parallel.mesh import barrier, gather_objects, rank

FORMAT = "nanoseek-train-checkpoint"
VERSION = 3  # 1: HF model/ + optimizer.pt, one process; 2: no checksums (still read, unverified)
REQUIRED = ("format", "version", "step", "param_names")
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


def resume_hint(command: str, out: str | os.PathLike, argv: list[str]) -> str:
    """What an interrupted run in `out` says: its last checkpoint and the command that continues it (the saved
    DIR/config.toml once written, else the original arguments)."""
    out, last = Path(out), latest_checkpoint(out)
    where = f"last checkpoint: step {int(_STEP_DIR.match(last.name).group(1))}" if last else "no checkpoint yet"
    if (out / "config.toml").is_file():
        words = ["nanoseek", command, "--out", os.fspath(out), "--resume"]
    else:
        words = ["nanoseek", *argv, *([] if any(a.startswith("--out") for a in argv) else ["--out", os.fspath(out)]),
                 *([] if "--resume" in argv else ["--resume"])]
    return f"({where}); resume with: {shlex.join(words)}"


def open_run_dir(out_dir: str | os.PathLike, resume: bool) -> tuple[Path, Path | None]:
    """Create the run directory; return it and the checkpoint to resume from (None for a fresh run).

    A fresh run refuses a directory that already holds checkpoints, so nothing is overwritten by accident."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if rank() == 0:  # what a killed save or export left behind (their pids are gone with them)
        for leftover in [*out.glob(".*.tmp-*"), *out.glob(".*.old-*"), *checkpoint_dir(out).glob(".tmp-step-*")]:
            shutil.rmtree(leftover, ignore_errors=True)
    barrier()
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


def _rng_state() -> dict[str, torch.Tensor]:
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return rng


@contextlib.contextmanager
def _single_process_ok():
    """(DCP warns in every plain-process save and load that no process group exists: that is intended)"""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, keep_last: int = 2) -> Path:
    """Write DIR/checkpoints/step-{step:08d} atomically and keep only the newest `keep_last` (every rank calls)."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}"
    main = rank() == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    names = _all_param_names(model)
    try:
        model_state, optim_state = get_state_dict(model, optimizer)
        with _single_process_ok():
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp / "state")
        save_file(_rng_state(), tmp / f"rng-{rank():05d}.safetensors")
        barrier()
        if main:
            meta = {"format": FORMAT, "version": VERSION, "step": step,
                    "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                    "param_names": names, **state, "files": _file_digests(tmp)}
            meta["content_sha256"] = _content_digest(meta)
            with open(tmp / "trainer_state.json", "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            _replace_dir(tmp, final)
            for old in list_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as e:  # a full disk, a lost mount: the checkpoints already written stay whole
        raise CheckpointError(f"cannot write checkpoint {final}: {e.strerror or e} ({e.filename or tmp}); "
                              "the earlier checkpoints are intact") from None
    finally:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    return final


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file below root but trainer_state.json, by path relative to root."""
    return {p.relative_to(root).as_posix(): _sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "trainer_state.json"}


def _content_digest(state: dict) -> str:
    return hashlib.sha256(json.dumps({k: v for k, v in state.items() if k != "content_sha256"},
                                     sort_keys=True).encode()).hexdigest()


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """The trainer state of a checkpoint directory after checking it whole: its fields, and the checksums of its
    own content and of every file (a CheckpointError names the file and what is wrong)."""
    path = Path(path)
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{state_file} not found: {path} is not a complete training checkpoint")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{state_file}: not valid JSON ({e})") from None
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{state_file}: missing {', '.join(missing)}")
    if state["format"] != FORMAT:
        raise CheckpointError(f"{state_file}: format {state['format']!r}, expected {FORMAT!r}")
    if state["version"] not in (2, VERSION):
        raise CheckpointError(f"{state_file}: checkpoint version {state['version']}, this nanoseek reads "
                              f"versions 2 and {VERSION}; start a new run from its weights with model.init_from")
    if state["version"] == 2:
        warnings.warn(f"{path}: a version-2 checkpoint has no checksums; loading it unverified")
        return state
    if state.get("content_sha256") != _content_digest(state):
        raise CheckpointError(f"{state_file}: its content does not match its checksum (edited or damaged)")
    found = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {"trainer_state.json"}
    for name in sorted(set(state["files"]) | found):
        if name not in found:
            raise CheckpointError(f"{path / name}: missing")
        if name not in state["files"]:
            raise CheckpointError(f"{path / name}: not part of the checkpoint as written")
        if _sha256(path / name) != state["files"][name]:
            raise CheckpointError(f"{path / name}: checksum mismatch (the file changed or is damaged)")
    return state


def resume_latest(run_dir: str | os.PathLike, load) -> Path:
    """Call `load(checkpoint)` on the newest checkpoint of run_dir that loads, newest first; each damaged one is
    skipped with a warning naming what is wrong. Raises CheckpointError when none is intact."""
    problems = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            load(ckpt)
        except CheckpointError as e:
            problems.append(f"{ckpt.name}: {e}")
            warnings.warn(f"skipping damaged checkpoint {ckpt.name}: {e}", stacklevel=2)
            continue
        if problems:
            warnings.warn(f"resumed from {ckpt.name}, the newest intact checkpoint", stacklevel=2)
        return ckpt
    raise CheckpointError(f"no intact checkpoint in {checkpoint_dir(run_dir)}" +
                          (": " + "; ".join(problems) if problems else ""))


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore model, optimizer and RNG from a checkpoint directory, whatever the layout it was saved
    with (every rank calls), after `verify_checkpoint`; returns its trainer state."""
    path = Path(path)
    state_file = path / "trainer_state.json"
    state = verify_checkpoint(path)
    names = _all_param_names(model)
    if sorted(state["param_names"]) != sorted(names):
        missing = sorted(set(names) - set(state["param_names"]))
        unexpected = sorted(set(state["param_names"]) - set(names))
        raise CheckpointError(f"{state_file}: the checkpoint was written for another model: missing parameters "
                              f"{missing[:6]}, unexpected parameters {unexpected[:6]}")
    if optimizer is None:
        model_state, optim_state = get_model_state_dict(model), None
        target = {"model": model_state}
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        target = {"model": model_state, "optim": optim_state}
    with _single_process_ok():
        dcp.load(target, checkpoint_id=path / "state")
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=model_state,
                   optim_state_dict=optim_state or {})
    rng_file = path / f"rng-{rank():05d}.safetensors"
    rng = load_file(rng_file if rng_file.is_file() else path / "rng-00000.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    return state


def _all_param_names(model: nn.Module) -> list[str]:
    """The parameter names of the whole model: every rank's, when pipeline ranks each hold some layers."""
    names = [n for n, _ in model.named_parameters()]
    if not dist.is_initialized():
        return names
    merged: dict[str, None] = {}
    for rank_names in gather_objects(names):
        merged.update(dict.fromkeys(rank_names))
    return list(merged)


def full_model_state(model: nn.Module, pp_group=None, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The whole model's state dict as plain CPU tensors on rank 0, or on every rank with `everywhere` (every
    rank calls; the others get {}). `pp_group`: pipeline ranks each hold some of the model; gathered too."""
    sharded = dist.is_initialized() and any(isinstance(p, DTensor) for p in model.parameters())
    if pp_group is None and not sharded:
        return model.state_dict()  # (an unsharded model, e.g. GRPO's per-rank reference: rank 0 has it all)
    if pp_group is None and not everywhere:
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    mine = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)) if sharded \
        else model.state_dict()
    mine = {k: v.cpu() for k, v in mine.items()}
    if pp_group is None:
        return mine
    parts = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(parts, mine, group=pp_group)
    return {k: v for part in parts for k, v in part.items()} if everywhere or rank() == 0 else {}


def export_model(model: nn.Module, tokenizer, out_dir: str | os.PathLike, pp_group=None) -> Path:
    """Write the model (HF layout, gathered to rank 0) and its tokenizer to out_dir, replacing it atomically
    (every rank calls). A model transformers would compute differently (a V2-layout one with routing biases)
    is written whole all the same, for nanoseek, with a warning saying why transformers cannot use it."""
    out = Path(out_dir)
    state = full_model_state(model, pp_group)
    if rank() == 0:
        mismatch = transformers_mismatch(model.config, state)
        if mismatch:
            warnings.warn(f"{out}: for nanoseek only: {mismatch}", stacklevel=2)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            save_pretrained(model, tmp, state_dict=state, nanoseek_only=True)
            if tokenizer is not None:
                tokenizer.save(tmp)
            _replace_dir(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    return out
