"""The training loop every run shares: pretraining and each post-training method subclass `Trainer`.

A subclass builds its data and `self.model` in `setup()` and does one optimizer step's work in
`train_step()` (forward and backward over its micro-batches, then `self.optimizer_step(loss)`),
returning that step's metrics record; `evaluate()`, `extra_state()` / `load_extra_state()` (what a
checkpoint must hold beyond weights, AdamW and the loop's own state), `data_state()` /
`load_data_state()` (the data position, kept across a rollback) and `summarize()` are optional.
The loop does the rest, the same way for every method:

- device, threads, determinism, FP8 layers, the CPU fast paths, torch.compile, AdamW, the LR schedule;
- autocast (`autocast`) and gradient accumulation over micro-batches (`micro_slices`);
- clipping and the guard: a step whose loss or gradient norm is not finite, or (train.spike_factor)
  whose loss exceeds spike_factor × its running mean, is skipped; max_bad_steps skips in a row roll
  the model and optimizer back to the last checkpoint while the data moves on past the bad batches;
- checkpoints (atomic, `nanoseek.train.checkpoint`) and bit-identical resume, refusing a config that
  changed in a key a resumed run may not change;
- evaluation and checkpoint cadence, metrics.jsonl (+ TensorBoard), a progress bar, the time limit,
  DIR/config.toml and DIR/summary.json;
- ranks, in this one place: under torchrun the loop joins the process group, checks `[parallel]`
  against the world size and the model, applies the layout (`nanoseek.parallel.parallelize`: expert
  parallelism, FSDP2), and keeps every rank in step: rank 0 alone writes logs, metrics and files;
  `reduce` averages or sums a step's numbers over the ranks before they are logged or steer anything
  (the guard, the router biases, the time limit), so every rank takes the same decisions; checkpoints
  are sharded (`nanoseek.train.checkpoint`). A method reads its share of the data with `dp_rank`,
  `dp_size` and `micro_batch` (train.batch_size is global: the same config trains the same way on any
  number of ranks).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from nanoseek import fastpath
from nanoseek.parallel.mesh import (
    ParallelDims,
    barrier,
    env_world_size,
    init_distributed,
    local_rank,
    rank,
)
from nanoseek.parallel.parallelize import parallelize
from nanoseek.parallel.pipeline import Pipeline
from nanoseek.quant.fp8 import FP8Recipe, convert_to_fp8
from nanoseek.train.checkpoint import (
    export_model,
    latest_checkpoint,
    load_checkpoint,
    open_run_dir,
    resume_latest,
    save_checkpoint,
)
from nanoseek.train.config import RunConfig
from nanoseek.train.metrics import MetricsLogger, read_metrics, truncate_metrics
from nanoseek.train.optim import (
    build_optimizer,
    clip_grad_norm,
    set_lr,
    state_bytes_per_param,
)
from nanoseek.utils import atomic_write_text, progress_bar


class TrainingError(RuntimeError):
    """Training cannot go on (diverged past the rollback budget, or nothing to roll back to)."""


def resolve_device(name: str) -> torch.device:
    """The device of train.device; under torchrun "cuda" means this rank's GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device = {name!r} is invalid: CUDA is not available here (use cpu or auto)")
    if device.type == "cuda" and device.index is None and env_world_size() > 1:
        device = torch.device("cuda", local_rank())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def autocast(dtype: str, device: torch.device | str = "cpu"):
    """bf16 autocast for train.dtype = "bf16", else nothing (fp32)."""
    if dtype == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def micro_slices(n: int, micro: int) -> list[tuple[int, int]]:
    """[start, end) of the micro-batches of a batch of n (micro = 0: one pass)."""
    micro = micro or n
    return [(i, min(i + micro, n)) for i in range(0, n, micro)]


class _NoMetrics:
    """The metrics log of ranks other than 0."""

    def write(self, record: dict) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class Trainer:
    """Sets up everything (checking every input) in __init__; `run()` trains. See the module docstring."""

    command = "train"

    def __init__(self, cfg: RunConfig, out_dir: str | os.PathLike, *, resume: bool = False,
                 progress: bool | None = None):
        self.cfg = cfg.validate()
        t = cfg.train
        self.device = resolve_device(t.device)
        init_distributed(self.device, cfg.parallel.timeout)
        self.rank, self.world_size = rank(), env_world_size()
        self.main = self.rank == 0
        self.dims = ParallelDims.resolve(cfg.parallel, self.world_size)
        if self.dims.pp > 1 and not self.pipelined:
            raise ValueError(f"parallel.pp = {self.dims.pp}: `{self.command}` does not run pipelined yet (pretrain and "
                             "sft do); use data and expert parallelism")
        # pipeline ranks outermost: rank = pp index x dp ranks + dp index
        self.dp_rank, self.dp_size = self.rank % self.dims.dp_world, self.dims.dp_world
        self.micro_batch = t.micro_batch_size or t.batch_size // self.dp_size
        if t.batch_size % (self.micro_batch * self.dp_size):
            raise ValueError(f"train.batch_size = {t.batch_size} must be a multiple of train.micro_batch_size x "
                             f"data-parallel ranks = {self.micro_batch} x {self.dp_size} (the batch is global)")
        self.progress = (cfg.log.progress if progress is None else progress) and self.main
        self.out, self._resume_from = open_run_dir(out_dir, resume)
        barrier()  # (every rank has seen the directory before rank 0 writes into it)
        if self._resume_from is not None:
            self._check_resumable_config()
        self._torch_settings = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
        if t.threads:
            torch.set_num_threads(t.threads)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            self.model = None
            self.setup()
            self.dims = ParallelDims.resolve(cfg.parallel, self.world_size, self.model.config)
            if t.fp8:
                convert_to_fp8(self.model, recipe=FP8Recipe(accumulation=t.fp8_accumulation))
            fastpath.enable(self.model).to(self.device)
            self.pipeline, self.dp_group, self.pp_group = None, None, None
            if self.world_size > 1:
                meshes = self.dims.build_meshes(self.device.type)
                self.dp_group = meshes.dp.get_group()
                if self.dims.pp > 1:
                    self.pipeline = Pipeline(self.model, meshes.pp, self.dims.pp_schedule, self.dims.microbatches,
                                             list(self.dims.pp_layers), mtp=self.pipeline_mtp)
                    self.pp_group = meshes.pp.get_group()
                if self.dims.dp_world > 1:  # (pipeline ranks alone have nothing to shard)
                    parallelize(self.model, self.dims, meshes, roots=self.pipeline.stages if self.pipeline else None,
                                bf16_params=self.device.type == "cuda" and t.dtype == "bf16")
                if self.pipeline:
                    self.pipeline.build(self.device, self.pipeline_loss)
            o = cfg.optim
            self.moments = o.moments(t.fp8)
            self.optimizer = build_optimizer(self.model, o.lr, (o.beta1, o.beta2), o.eps, o.weight_decay,
                                             torch.bfloat16 if self.moments == "bf16" else torch.float32)
            self.forward = torch.compile(self.model) if t.compile else self.model
        except BaseException:
            self._restore_torch_settings()
            raise
        self.lr_schedule = cfg.lr_schedule()
        self.lr = self.lr_schedule(0)
        # loop state (all of it goes into checkpoints)
        self.step = 0
        self.train_time = 0.0
        self.loss_ema: float | None = None
        self.accepted = 0
        self.bad_streak = 0
        self.rollbacks = 0
        self.skipped: str | None = None
        self.last_checkpoint_step = -1
        self.optim_bytes: float | None = None  # AdamW state per parameter, measured once the state exists

    # ------------------------------------------------------------------ what a method provides
    def setup(self) -> None:
        """Build the data, `self.model` (on the CPU; the loop moves it) and `self.tok` (exported with it)."""
        raise NotImplementedError

    def train_step(self) -> dict:
        """One optimizer step: forward and backward, then `optimizer_step`; returns its metrics record."""
        raise NotImplementedError

    def evaluate(self) -> dict:
        return {}

    pipelined = False
    """Whether the method runs pipelined (parallel.pp > 1): it then provides `pipeline_loss`."""
    pipeline_mtp = False
    """Whether its pipeline's last stage runs the MTP modules (their logits come after the main ones)."""

    def pipeline_loss(self, outputs: tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor:
        """One micro-batch's loss from the last stage's outputs (pipelined methods)."""
        raise NotImplementedError

    def evaluate_at_start(self) -> bool:
        return False

    def eval_line(self, record: dict) -> str | None:
        """A line for the console after an evaluation (None: nothing)."""
        return None

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def data_state(self) -> dict:
        return {}

    def load_data_state(self, state: dict) -> None:
        pass

    def summarize(self, records: list[dict]) -> dict:
        """Method-specific fields of DIR/summary.json, from the run's metrics records."""
        return {}

    # ------------------------------------------------------------------ the step
    def autocast(self):
        return autocast(self.cfg.train.dtype, self.device)

    def reduce(self, x: torch.Tensor, op: str = "sum", over: str = "dp") -> torch.Tensor:
        """x summed ("sum"), averaged ("mean") or maximized ("max") over the data-parallel ranks (`over` =
        "pp": over the pipeline ranks; x itself in one process). A number every pipeline stage computes alike
        is reduced over "dp"; a number of the stages' own (the last stage's losses, each stage's expert load)
        is summed over "pp" first."""
        group = self.dp_group if over == "dp" else self.pp_group
        if group is None:
            return x
        y = x.detach().to(self.device, torch.float64 if x.is_floating_point() else x.dtype).clone()
        dist.all_reduce(y, dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
        return (y / dist.get_world_size(group) if op == "mean" else y).to(x.dtype).to(x.device)

    def reduce_values(self, values: dict[str, float], op: str = "mean") -> dict[str, float]:
        """A dict of numbers reduced over the ranks in one collective."""
        if self.world_size == 1 or not values:
            return values
        out = self.reduce(torch.tensor(list(values.values()), dtype=torch.float64), op)
        return dict(zip(values, out.tolist()))

    def lockstep(self, batches, filler=None):
        """(batch, counted) over this rank's share of an evaluation set, padded so every rank runs as many
        forwards as the busiest (sharded layers gather parameters, and the all-to-all waits for every
        rank, in each one): a rank out of batches repeats its first (or `filler`) with counted = False."""
        batches = list(batches)
        rounds = int(self.reduce(torch.tensor(len(batches)), "max"))
        for i in range(rounds):
            yield (batches[i], True) if i < len(batches) else (batches[0] if batches else filler, False)

    def optimizer_step(self, loss: float | None = None) -> float:
        """Clip, then step unless the step is bad (non-finite loss or gradient norm, or a loss spike: the update
        is skipped and `self.skipped` says why); zero the gradients. Returns the norm before clipping."""
        t = self.cfg.train
        norm = clip_grad_norm(self.model, self.cfg.optim.grad_clip, self.pp_group)
        skipped = None
        if not (math.isfinite(norm) and (loss is None or math.isfinite(loss))):
            skipped = "non-finite"
        elif (loss is not None and t.spike_factor and self.accepted >= t.spike_warmup and self.loss_ema is not None
              and loss > t.spike_factor * self.loss_ema):
            skipped = "spike"
        if skipped is None:
            self.optimizer.step()
            if loss is not None:
                self.loss_ema = loss if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * loss
            self.accepted += 1
            self.bad_streak = 0
        else:
            self.skipped = skipped
            self.bad_streak += 1
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        state = {"command": self.command, "train_time": self.train_time, "loss_ema": self.loss_ema,
                 "accepted_steps": self.accepted, "bad_streak": self.bad_streak,
                 "extra": self.extra_state(), "config": self.cfg.to_toml(comments=False)}
        path = save_checkpoint(self.out, self.step, self.model, self.optimizer, state,
                               keep_last=self.cfg.checkpoint.keep)
        export_model(self.model, self.tok, self.out / "model", self.pp_group)
        self.last_checkpoint_step = self.step
        return path

    def load_checkpoint(self, path: Path) -> None:
        state = load_checkpoint(path, self.model, self.optimizer)
        if state.get("command", self.command) != self.command:
            raise ValueError(f"{path} is a `{state.get('command')}` checkpoint, not `{self.command}`")
        self.step = int(state["step"])
        self.train_time = float(state.get("train_time", 0.0))
        self.loss_ema = state.get("loss_ema")
        self.accepted = int(state.get("accepted_steps", 0))
        self.bad_streak = int(state.get("bad_streak", 0))
        self.load_extra_state(state.get("extra", {}))
        self.last_checkpoint_step = self.step

    def _check_resumable_config(self) -> None:
        saved_path = self.out / "config.toml"
        if not saved_path.is_file():
            return
        saved = type(self.cfg).from_toml_text(saved_path.read_text(encoding="utf-8"), os.fspath(saved_path))
        changed = self.cfg.changed_keys(saved)
        if changed:
            before, now = saved.flatten(), self.cfg.flatten()
            diffs = ", ".join(f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed[:6])
            raise ValueError(f"cannot resume {self.out} with a different config ({diffs}); only "
                             f"{', '.join(self.cfg.resumable)} may change")

    def _rollback(self, record: dict, log) -> None:
        t = self.cfg.train
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            raise TrainingError(f"{self.bad_streak} bad steps in a row at step {self.step} ({record.get('skipped')}) "
                                "and no checkpoint to roll back to")
        if self.rollbacks >= t.max_rollbacks:
            raise TrainingError(f"{self.bad_streak} bad steps in a row at step {self.step} after "
                                f"{self.rollbacks} rollbacks (train.max_rollbacks); stopping")
        data, failed_at = self.data_state(), self.step
        ckpt = resume_latest(self.out, self.load_checkpoint)
        self.load_data_state(data)  # the data moves on past the batches that failed
        self.rollbacks += 1
        self.bad_streak = 0
        record["rollback_to"] = self.step
        log(f"step {failed_at}: {t.max_bad_steps} bad steps in a row; rolled back to {ckpt.name} "
            f"(rollback {self.rollbacks}/{t.max_rollbacks}), data continues past the failed batches")

    # ------------------------------------------------------------------ the loop
    def _restore_torch_settings(self) -> None:
        threads, deterministic = self._torch_settings
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)

    def _out_of_time(self) -> bool:
        limit = self.cfg.train.time_limit
        return bool(limit) and self.train_time >= limit

    def _every(self, n: int) -> bool:
        return bool(n) and self.step % n == 0

    def run(self) -> dict:
        """Train to train.steps (or train.time_limit); returns the summary also written to DIR/summary.json."""
        cfg = self.cfg
        try:
            if self._resume_from is not None:
                resume_latest(self.out, self.load_checkpoint)
                if self.main:
                    truncate_metrics(self.out, self.step)
            elif self.main:
                for name in ("metrics.jsonl", "summary.json"):
                    (self.out / name).unlink(missing_ok=True)  # an earlier attempt that never checkpointed
            if self.main:
                atomic_write_text(self.out / "config.toml", cfg.to_toml())
            shown: dict[str, str] = {}
            with (MetricsLogger(self.out, cfg.log.tensorboard) if self.main else _NoMetrics()) as metrics, \
                    progress_bar(self.progress, total=cfg.train.steps, initial=self.step, unit="step",
                         desc=self.command, dynamic_ncols=True) as bar:
                log = bar.write if self.main else (lambda line: None)
                if self._resume_from is not None:
                    log(f"resumed {self.out} from {self._resume_from.name} (step {self.step})")
                if self.world_size > 1:
                    log(f"{self.world_size} ranks: {self.dims}")
                if self.step == 0 and self.evaluate_at_start():
                    start = {"step": 0, "loss": None, **self.evaluate()}
                    metrics.write(start)
                    self._print_eval(start, log)
                while self.step < cfg.train.steps and not self._out_of_time():
                    record = self._train_step(log)
                    rolled_back = "rollback_to" in record
                    final = self.step >= cfg.train.steps or self._out_of_time()
                    if not rolled_back and (final or self._every(cfg.eval.every)):
                        record.update(self.evaluate())
                        self._print_eval(record, log)
                    metrics.write(record)
                    if not rolled_back and (final or self._every(cfg.checkpoint.every)):
                        self.save_checkpoint()
                    shown.update({k: f"{record[k]:.3f}" for k in ("loss", "reward_mean", "val_bpb")
                                  if isinstance(record.get(k), float)})
                    bar.n = self.step
                    bar.set_postfix(shown, refresh=False)
                    bar.refresh()
            if self.last_checkpoint_step != self.step:
                self.save_checkpoint()
        finally:
            self._restore_torch_settings()
        barrier()  # (rank 0's metrics are complete)
        records = read_metrics(self.out)
        trained = [r for r in records if r.get("loss") is not None]
        summary = {"command": self.command, "steps": self.step, "train_time": self.train_time,
                   "loss": trained[-1]["loss"] if trained else None, "rollbacks": self.rollbacks,
                   "model_dir": os.fspath(self.out / "model"), "metrics": os.fspath(self.out / "metrics.jsonl"),
                   "config": os.fspath(self.out / "config.toml"),
                   "optim_bytes_per_param": state_bytes_per_param(self.optimizer), **self.summarize(records)}
        if self.main:
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=1) + "\n")
        return summary

    def _train_step(self, log) -> dict:
        """One step of the loop: LR, the method's step, timing, the guard's verdict."""
        self.model.train()
        self.lr = self.lr_schedule(self.step)
        set_lr(self.optimizer, self.lr)
        self.skipped = None
        t0 = time.perf_counter()
        record = self.train_step()
        elapsed = time.perf_counter() - t0
        if self.optim_bytes is None and self.optimizer.state:
            self.optim_bytes = state_bytes_per_param(self.optimizer)
            log(f"AdamW state: {self.optim_bytes:g} bytes/parameter ({self.moments} moments; + 8 for the fp32 "
                "master weights and gradients)")
        elapsed = float(self.reduce(self.reduce(torch.tensor(elapsed), "max", over="pp"), "max"))  # stop together
        self.step += 1
        self.train_time += elapsed
        record = {"step": self.step, **record, "lr": self.lr, "step_time": elapsed, "train_time": self.train_time}
        if self.skipped:
            record["skipped"] = self.skipped
            log(f"step {self.step}: skipped ({self.skipped}: loss {record.get('loss', float('nan')):.4g}, "
                f"grad norm {record.get('grad_norm', float('nan')):.4g})")
            if self.bad_streak >= self.cfg.train.max_bad_steps:
                self._rollback(record, log)
        return record

    def _print_eval(self, record: dict, log) -> None:
        line = self.eval_line(record)
        if line:
            log(line)
