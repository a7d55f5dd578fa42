"""Pretraining: the loop of DeepSeek-V3 §4 (and DeepSeek LLM §2.3, V2 §3.1) at any scale.

    from nanoseek.train.config import load_run_config
    from nanoseek.train.pretrain import pretrain
    summary = pretrain(load_run_config("configs/tiny.toml"), "runs/tiny")

One optimizer step: `n` micro-batches (train.grad_accum, or the batch-size ramp) of packed windows,
each scored with L = L_main + λ/D·Σ_k L_MTP,k + balance losses (see `nanoseek.train.losses`) under
bf16 autocast or fp32; the global gradient norm is clipped; AdamW steps with the scheduled LR; then
the aux-loss-free router biases move from the step's expert load (`nanoseek.train.balance`).

Guards: a step whose loss or gradient norm is not finite, or whose loss exceeds spike_factor × the
running mean, is skipped (no update, logged); max_bad_steps skips in a row roll the model and
optimizer back to the last checkpoint while the data stream moves on past the offending batches.

Everything a step depends on — weights, router biases, AdamW moments, step and token counters, the
loader's position, the loss statistics of the guards, RNG — is in the checkpoint, so `resume=True`
continues bit-identically (fp32, same thread count, or train.deterministic).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nanoseek.train.config import RunConfig, flatten, from_toml_text, to_toml

# Run-config keys that may change when a run is resumed; anything else must match the checkpoint.
RESUMABLE_CHANGES = ("train.steps", "train.threads", "train.deterministic", "train.max_rollbacks", "train.device",
                     "eval.", "checkpoint.", "log.", "data.cache_dir")

LossHook = Callable[[int, int, torch.Tensor], torch.Tensor]
"""hook(step, micro_batch, loss) -> loss, applied before backward (tests use it to inject NaNs)."""


class TrainingError(RuntimeError):
    """Training cannot go on (diverged past the rollback budget, or nothing to roll back to)."""


def _autocast(dtype: str, device: torch.device):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device = {name!r} is invalid: CUDA is not available here (use cpu or auto)")
    return device


class Trainer:
    """Sets up everything (checking every input) in __init__; `run()` trains."""

    def __init__(self, cfg: RunConfig, out_dir: str | os.PathLike, *, resume: bool = False,
                 loss_hook: LossHook | None = None, progress: bool | None = None):
        from nanoseek.data.loader import PackedLoader, ValLoader
        from nanoseek.data.shards import check_vocab, load_metadata
        from nanoseek.data.tokenizer import load_tokenizer
        from nanoseek.scaling.flops import training_flops_per_token
        from nanoseek.train.checkpoint import open_run_dir
        from nanoseek.train.dataset import resolve_dataset

        self.cfg = cfg.validate()
        self.loss_hook = loss_hook
        self.progress = cfg.log.progress if progress is None else progress
        t = cfg.train
        self.out, self._resume_from = open_run_dir(out_dir, resume)
        if self._resume_from is not None:
            self._check_resumable_config()

        # Data and tokenizer (before the model: the model's vocabulary and special ids come from them).
        base_cfg = self._base_model_config()
        self.dataset = resolve_dataset(cfg.data, self.out, base_cfg.vocab_size, progress=self.progress)
        self.meta = load_metadata(self.dataset)
        self.tokenizer = load_tokenizer(self.dataset / self.meta.get("tokenizer", "tokenizer"))
        ids = dict(bos_token_id=self.tokenizer.bos_id, eos_token_id=self.tokenizer.eos_id,
                   pad_token_id=self.tokenizer.pad_id)
        self.model_cfg = self._model_config(**ids)
        check_vocab(self.meta, self.model_cfg.vocab_size)
        self.depth = self.model_cfg.num_nextn_predict_layers
        S = self.seq_len = cfg.data.seq_len
        if S + self.depth > self.model_cfg.max_position_embeddings:
            raise ValueError(f"data.seq_len = {S} (+ MTP depth {self.depth}) exceeds the model's "
                             f"max_position_embeddings = {self.model_cfg.max_position_embeddings}")
        self.train_loader = PackedLoader(self.dataset, batch_size=t.batch_size, seq_len=S, extra=self.depth,
                                         seed=t.seed)
        self.val_loader = ValLoader(self.dataset, batch_size=cfg.eval.batch_size, seq_len=S,
                                    max_batches=cfg.eval.batches or None)
        val = self.meta["splits"]["val"]
        self.val_bytes_per_token = val["bytes"] / max(val["tokens"], 1)

        # Schedules (validated by cfg.validate; built once here).
        self.lr_schedule = cfg.lr_schedule()
        self.batch_ramp = cfg.batch_ramp()
        self.mtp_schedule = cfg.mtp_schedule()
        self.bias_schedule = cfg.bias_speed_schedule()

        # Model and optimizer.
        self.device = resolve_device(t.device)
        self.model = self._build_model().to(self.device)
        from nanoseek.train.optim import build_optimizer
        o = cfg.optim
        self.optimizer = build_optimizer(self.model, o.lr, (o.beta1, o.beta2), o.eps, o.weight_decay)
        self.forward = torch.compile(self.model) if t.compile else self.model
        self.flops_per_token = training_flops_per_token(S, **self.model_cfg.to_dict()).total

        # Loop state (all of it goes into checkpoints).
        self.step = 0
        self.tokens_seen = 0
        self.loss_ema: float | None = None
        self.accepted = 0
        self.bad_streak = 0
        self.rollbacks = 0
        self.last_checkpoint_step = -1
        self._peak = None

    # ------------------------------------------------------------------ setup helpers
    def _base_model_config(self):
        from nanoseek.config import ModelConfig

        if self.cfg.model.init_from:
            return ModelConfig.from_pretrained(self.cfg.model.init_from)
        return self.cfg.model_config()

    def _model_config(self, **ids):
        cfg = self.cfg
        if not cfg.model.init_from:
            return cfg.model_config(**ids)
        from nanoseek.config import ModelConfig
        from nanoseek.train.toml_config import null

        base = ModelConfig.from_pretrained(cfg.model.init_from)
        own = cfg.model_config()  # only its balance / MTP weights are used
        overrides = {k: null(v) for k, v in cfg.model.overrides.items()}
        return base.replace(**{**overrides, **ids, "seq_aux_alpha": own.seq_aux_alpha,
                               "expert_aux_alpha": own.expert_aux_alpha, "device_aux_alpha": own.device_aux_alpha,
                               "comm_aux_alpha": own.comm_aux_alpha, "mtp_loss_weight": own.mtp_loss_weight})

    def _build_model(self):
        from nanoseek import fastpath
        from nanoseek.model.transformer import DeepSeekForCausalLM
        from nanoseek.train.balance import configure_token_dropping
        from nanoseek.train.checkpoint import load_model_state

        torch.manual_seed(self.cfg.train.seed)
        model = fastpath.enable(DeepSeekForCausalLM(self.model_cfg))
        if self.cfg.model.init_from:
            load_model_state(model, self.cfg.model.init_from)
        model.train()
        configure_token_dropping(model, self.cfg.balance.capacity_factor, self.cfg.balance.no_drop_fraction)
        if self.cfg.train.fp8:
            from nanoseek.quant.fp8 import convert_to_fp8
            convert_to_fp8(model)
        return model

    def _check_resumable_config(self) -> None:
        saved_path = self.out / "config.toml"
        if not saved_path.is_file():
            return
        saved = flatten(from_toml_text(saved_path.read_text(encoding="utf-8"), os.fspath(saved_path)))
        now = flatten(self.cfg)
        changed = [k for k in now if now[k] != saved.get(k) and not k.startswith(RESUMABLE_CHANGES)]
        if changed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed[:6])
            raise ValueError(f"cannot resume {self.out} with a different config ({diffs}); only "
                             f"{', '.join(RESUMABLE_CHANGES)} may change")

    # ------------------------------------------------------------------ state
    def trainer_state(self) -> dict:
        return {
            "tokens_seen": self.tokens_seen,
            "loader": self.train_loader.state_dict(),
            "scheduler": {"name": self.cfg.schedule.lr_schedule, "step": self.step,
                          "lr": self.lr_schedule(self.step)},
            "loss_ema": self.loss_ema,
            "accepted_steps": self.accepted,
            "bad_streak": self.bad_streak,
            "dataset": os.fspath(self.dataset),
            "config": to_toml(self.cfg, comments=False),
        }

    def save_checkpoint(self) -> Path:
        from nanoseek.train.checkpoint import export_model, save_checkpoint

        path = save_checkpoint(self.out, self.step, self.model, self.optimizer, self.trainer_state(),
                               keep_last=self.cfg.checkpoint.keep)
        export_model(self.model, self.tokenizer, self.out / "model")
        self.last_checkpoint_step = self.step
        return path

    def load_checkpoint(self, path: Path, restore_loader: bool = True) -> None:
        from nanoseek.train.checkpoint import load_checkpoint

        state = load_checkpoint(path, self.model, self.optimizer)
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.loss_ema = state["loss_ema"]
        self.accepted = int(state["accepted_steps"])
        self.bad_streak = int(state["bad_streak"])
        if restore_loader:
            self.train_loader.load_state_dict(state["loader"])
        self.last_checkpoint_step = self.step

    # ------------------------------------------------------------------ one step
    def micro_batches(self) -> int:
        if self.batch_ramp is None:
            return self.cfg.train.grad_accum
        return self.batch_ramp(self.tokens_seen) // self.cfg.train.batch_size

    def train_step(self) -> dict:
        """One optimizer step (or a skipped one); returns its metrics record."""
        from nanoseek.train.balance import bias_stats, drop_fraction, update_biases
        from nanoseek.train.losses import lm_losses, model_inputs, total_loss
        from nanoseek.train.metrics import load_summary
        from nanoseek.train.optim import clip_grad_norm, set_lr

        cfg, t = self.cfg, self.cfg.train
        step, S, D = self.step, self.seq_len, self.depth
        n_micro = self.micro_batches()
        lr = self.lr_schedule(step)
        mtp_weight = self.mtp_schedule(step)
        bias_speed = self.bias_schedule(step)
        set_lr(self.optimizer, lr)
        t0 = time.perf_counter()
        sums = {"loss": 0.0, "mtp_loss": 0.0, "aux_loss": 0.0, "total_loss": 0.0}
        mtp_depths = [0.0] * D
        load = None
        for micro in range(n_micro):
            window = next(self.train_loader).to(self.device, non_blocking=True)
            with _autocast(t.dtype, self.device):
                out = self.forward(model_inputs(window, S, D))
                main, mtp = lm_losses(out, window, S)
                loss = total_loss(main, mtp, mtp_weight, out.aux_loss)
            if self.loss_hook is not None:
                loss = self.loss_hook(step, micro, loss)
            (loss / n_micro).backward()
            sums["loss"] += main.item() / n_micro
            sums["total_loss"] += loss.item() / n_micro
            if mtp:
                sums["mtp_loss"] += sum(m.item() for m in mtp) / len(mtp) / n_micro
                for k, m in enumerate(mtp):
                    mtp_depths[k] += m.item() / n_micro
            if out.aux_loss is not None:
                sums["aux_loss"] += out.aux_loss.item() / n_micro
            if out.expert_load is not None:
                load = out.expert_load.detach().clone() if load is None else load + out.expert_load.detach()
        grad_norm = clip_grad_norm(self.model, cfg.optim.grad_clip)

        skipped = None
        if not (math.isfinite(sums["total_loss"]) and math.isfinite(grad_norm)):
            skipped = "non-finite"
        elif (t.spike_factor and self.accepted >= t.spike_warmup and self.loss_ema is not None
              and sums["total_loss"] > t.spike_factor * self.loss_ema):
            skipped = "spike"
        if skipped is None:
            self.optimizer.step()
            if load is not None and bias_speed:
                update_biases(self.model, load, bias_speed, cfg.balance.center_bias)
            total = sums["total_loss"]
            self.loss_ema = total if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * total
            self.accepted += 1
            self.bad_streak = 0
        else:
            self.bad_streak += 1
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0

        tokens = n_micro * t.batch_size * S
        self.step += 1
        self.tokens_seen += tokens
        tokens_per_s = tokens / elapsed
        record = {"step": self.step, **sums, "lr": lr, "grad_norm": grad_norm, "mtp_weight": mtp_weight,
                  "tokens": self.tokens_seen, "batch_size": n_micro * t.batch_size, "tokens_per_s": tokens_per_s,
                  "mfu": tokens_per_s * self.flops_per_token / self.peak_flops, "step_time": elapsed}
        if D > 1:
            record["mtp_loss_per_depth"] = mtp_depths
        if load is not None:
            record.update(load_summary(load))
            record["bias_update_speed"] = bias_speed
            record.update(bias_stats(self.model))
            if cfg.log.expert_load_every and self.step % cfg.log.expert_load_every == 0:
                record["expert_load"] = load.tolist()
        dropped = drop_fraction(out)
        if dropped is not None:
            record["dropped_fraction"] = dropped
        if skipped:
            record["skipped"] = skipped
        return record

    @property
    def peak_flops(self) -> float:
        if self._peak is None:
            from nanoseek.train.metrics import measure_matmul_peak
            self._peak = measure_matmul_peak(torch.bfloat16 if self.cfg.train.dtype == "bf16" else torch.float32,
                                             device=self.device)
        return self._peak

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out loss, bits per byte and MaxVio_global (expert load summed over the evaluated set)."""
        import torch.nn.functional as F

        from nanoseek.train.balance import max_violation

        self.model.eval()
        nll, count, load = 0.0, 0, None
        try:
            for window in self.val_loader:
                window = window.to(self.device, non_blocking=True)
                with _autocast(self.cfg.train.dtype, self.device):
                    out = self.model(window[:, :-1], mtp=False)
                targets = window[:, 1:]
                nll += F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").item()
                count += targets.numel()
                if out.expert_load is not None:
                    load = out.expert_load.clone() if load is None else load + out.expert_load
        finally:
            self.model.train()
        val_loss = nll / count
        # bits per byte = nats per token / ln 2 × tokens per byte of the held-out text (metadata.json)
        record = {"val_loss": val_loss, "val_bpb": val_loss / math.log(2) / self.val_bytes_per_token,
                  "val_tokens": count}
        if load is not None:
            vio = max_violation(load)
            record.update({"max_vio_global": [round(v, 4) for v in vio.tolist()],
                           "max_vio_global_mean": float(vio.mean()), "val_expert_load": load.tolist()})
        return record

    # ------------------------------------------------------------------ rollback
    def _rollback(self, record: dict, log) -> None:
        from nanoseek.train.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            raise TrainingError(f"{self.bad_streak} bad steps in a row at step {self.step} ({record.get('skipped')}) "
                                "and no checkpoint to roll back to")
        if self.rollbacks >= self.cfg.train.max_rollbacks:
            raise TrainingError(f"{self.bad_streak} bad steps in a row at step {self.step} after "
                                f"{self.rollbacks} rollbacks (train.max_rollbacks); stopping")
        loader_state = self.train_loader.state_dict()
        failed_at = self.step
        self.load_checkpoint(ckpt, restore_loader=False)
        self.train_loader.load_state_dict(loader_state)  # skip past the batches that failed
        self.rollbacks += 1
        self.bad_streak = 0
        record["rollback_to"] = self.step
        log(f"step {failed_at}: {self.cfg.train.max_bad_steps} bad steps in a row; rolled back to {ckpt.name} "
            f"(rollback {self.rollbacks}/{self.cfg.train.max_rollbacks}), data continues past the failed batches")

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        """Train to cfg.train.steps; returns a summary (final losses, last eval, paths)."""
        from tqdm import tqdm

        from nanoseek.train.metrics import MetricsLogger, truncate_metrics
        from nanoseek.utils import atomic_write_text

        cfg = self.cfg
        deterministic_before = torch.are_deterministic_algorithms_enabled()
        threads_before = torch.get_num_threads()
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            if self._resume_from is not None:
                self.load_checkpoint(self._resume_from)
                truncate_metrics(self.out, self.step)
            elif (self.out / "metrics.jsonl").exists():
                (self.out / "metrics.jsonl").unlink()  # an earlier attempt that never checkpointed
            atomic_write_text(self.out / "config.toml", to_toml(cfg))
            last_eval: dict = {}
            last: dict = {}
            with MetricsLogger(self.out, cfg.log.tensorboard) as metrics, \
                    tqdm(total=cfg.train.steps, initial=self.step, disable=not self.progress, unit="step",
                         dynamic_ncols=True) as bar:
                if self._resume_from is not None:
                    bar.write(f"resumed {self.out} from {self._resume_from.name} (step {self.step})")
                while self.step < cfg.train.steps:
                    record = self.train_step()
                    if record.get("skipped"):
                        bar.write(f"step {record['step']}: skipped ({record['skipped']}: loss {record['loss']:.4g}, "
                                  f"grad norm {record['grad_norm']:.4g})")
                        if self.bad_streak >= cfg.train.max_bad_steps:
                            self._rollback(record, bar.write)
                    step, rolled_back = self.step, "rollback_to" in record
                    if not rolled_back and (step == cfg.train.steps or (cfg.eval.every and step % cfg.eval.every == 0)):
                        last_eval = self.evaluate()
                        record.update(last_eval)
                    metrics.write(record)
                    last = record
                    if not rolled_back and (step == cfg.train.steps or
                                            (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)):
                        self.save_checkpoint()
                    bar.n = step
                    bar.set_postfix(loss=f"{record['loss']:.3f}", **(
                        {"val_bpb": f"{last_eval['val_bpb']:.3f}"} if last_eval else {}), refresh=False)
                    bar.refresh()
            if self.last_checkpoint_step != self.step:
                self.save_checkpoint()
        finally:
            torch.use_deterministic_algorithms(deterministic_before)
            torch.set_num_threads(threads_before)
        if not last:  # resumed a finished run: report what its metrics say
            from nanoseek.train.metrics import read_metrics
            records = [r for r in read_metrics(self.out) if "loss" in r]
            last = records[-1] if records else {}
            last_eval = next((r for r in reversed(records) if "val_loss" in r), {})
            last_eval = {k: v for k, v in last_eval.items() if k.startswith(("val_", "max_vio_global"))}
        return {"steps": self.step, "tokens": self.tokens_seen, "loss": last.get("loss"), **last_eval,
                "rollbacks": self.rollbacks, "model_dir": os.fspath(self.out / "model"),
                "metrics": os.fspath(self.out / "metrics.jsonl")}


def pretrain(cfg: RunConfig, out_dir: str | os.PathLike, *, resume: bool = False, loss_hook: LossHook | None = None,
             progress: bool | None = None) -> dict:
    """Pretrain per `cfg` into `out_dir` (metrics.jsonl, checkpoints/, model/, config.toml); see Trainer."""
    return Trainer(cfg, out_dir, resume=resume, loss_hook=loss_hook, progress=progress).run()
