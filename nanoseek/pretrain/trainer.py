"""Pretraining: the step of DeepSeek-V3 §4 (and DeepSeek LLM §2.3, V2 §3.1) on the shared loop.

    from nanoseek.pretrain.config import PretrainConfig
    from nanoseek.pretrain.trainer import pretrain
    summary = pretrain(PretrainConfig.load("configs/tiny.toml"), "runs/tiny")

One optimizer step: train.batch_size sequences (or the batch-size ramp's) in micro-batches of
train.micro_batch_size packed windows, each scored with L = L_main + λ/D·Σ_k L_MTP,k + balance losses
(see `nanoseek.pretrain.losses`) under bf16 autocast or fp32; then the loop's clipping, guard and
AdamW step (`nanoseek.train.loop`); then the aux-loss-free router biases move from the step's expert
load (`nanoseek.pretrain.balance`).

Everything a step depends on — weights, router biases, AdamW moments, step and token counters, the
loader's position, the loss statistics of the guards, RNG — is in the checkpoint, so `resume=True`
continues bit-identically (fp32, same thread count, or train.deterministic).
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from nanoseek import fastpath
from nanoseek.data.loader import PackedLoader, ValLoader
from nanoseek.data.shards import TokenSplit, check_vocab, load_metadata
from nanoseek.data.tokenizer import load_tokenizer
from nanoseek.interop.hf import load_weights
from nanoseek.model.transformer import DeepSeekForCausalLM
from nanoseek.parallel.expert import take_sent_bytes
from nanoseek.parallel.mesh import main_first
from nanoseek.parallel.pipeline import moe_rows
from nanoseek.pretrain.balance import (
    bias_stats,
    configure_token_dropping,
    drop_fraction,
    update_biases,
)
from nanoseek.pretrain.config import PretrainConfig
from nanoseek.pretrain.dataset import resolve_dataset
from nanoseek.pretrain.losses import document_mask, lm_losses, model_inputs, total_loss
from nanoseek.scaling.flops import count_params, training_flops_per_token
from nanoseek.train.checkpoint import full_model_state
from nanoseek.train.loop import Trainer, TrainingError  # noqa: F401  (TrainingError: raised by run())
from nanoseek.train.metrics import load_summary, max_violation, measure_matmul_peak
from nanoseek.utils import available_memory

LossHook = Callable[[int, int, torch.Tensor], torch.Tensor]
"""hook(step, micro_batch, loss) -> loss, applied before backward (tests use it to inject NaNs)."""


def check_training_memory(model_cfg, moments_dtype: str) -> None:
    """Refuse, before anything is built, a model whose weights, gradients and AdamW state alone (fp32, fp32,
    and the moments) exceed the memory available: a huge vocab_size would otherwise end in an allocator abort."""
    params = count_params(**model_cfg.to_dict()).total
    need = params * (4 + 4 + (4 if moments_dtype == "bf16" else 8))
    available = available_memory()
    if available is not None and need > available:
        raise ValueError(f"the model has {params:,} parameters (vocab_size {model_cfg.vocab_size:,}, hidden_size "
                         f"{model_cfg.hidden_size:,}): training needs at least {need / 2**30:.1f} GiB for its weights, "
                         f"gradients and AdamW state, more than the {available / 2**30:.1f} GiB available")


class Pretrainer(Trainer):
    """Pretraining on packed token windows (see the module docstring)."""

    command = "pretrain"
    pipelined = pipeline_mtp = True

    def __init__(self, cfg: PretrainConfig, out_dir: str | os.PathLike, *, resume: bool = False,
                 loss_hook: LossHook | None = None, progress: bool | None = None):
        self.loss_hook = loss_hook
        super().__init__(cfg, out_dir, resume=resume, progress=progress)
        self.mtp_schedule = cfg.mtp_schedule()
        self.bias_schedule = cfg.bias_speed_schedule()
        self.batch_ramp = cfg.batch_ramp(self.dp_size)
        self.flops_per_token = training_flops_per_token(self.seq_len, **self.model_cfg.to_dict()).total
        self.tokens_seen = 0
        self._peak = None

    def setup(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        if self.world_size == 1:
            check_training_memory(cfg.model.model_config(), cfg.optim.moments(t.fp8))
        # Data and tokenizer first: the model's vocabulary and special ids come from them.
        base_vocab = cfg.model.model_config().vocab_size
        self.dataset = main_first(lambda: resolve_dataset(cfg.data, cfg.model.tokenizer, self.out, base_vocab,
                                                                  progress=self.progress))
        self.meta = load_metadata(self.dataset)
        self.tok = load_tokenizer(self.dataset / self.meta.get("tokenizer", "tokenizer"))
        self.model_cfg = cfg.model.model_config(bos_token_id=self.tok.bos_id, eos_token_id=self.tok.eos_id,
                                                pad_token_id=self.tok.pad_id)
        check_vocab(self.meta, self.model_cfg.vocab_size)
        self.depth = self.model_cfg.num_nextn_predict_layers
        S = self.seq_len = cfg.data.seq_len
        if S + self.depth > self.model_cfg.max_position_embeddings:
            raise ValueError(f"data.seq_len = {S} (+ MTP depth {self.depth}) exceeds the model's "
                             f"max_position_embeddings = {self.model_cfg.max_position_embeddings}")
        self.cuts = self._document_cuts() if cfg.data.document_mask else None
        self.train_loader = PackedLoader(self.dataset, batch_size=self.micro_batch, seq_len=S, extra=self.depth,
                                         seed=t.seed, rank=self.dp_rank, world_size=self.dp_size)
        self.val_loader = ValLoader(self.dataset, batch_size=cfg.eval.batch_size, seq_len=S,
                                    max_batches=cfg.eval.batches or None, rank=self.dp_rank, world_size=self.dp_size)
        # (what a rank with no held-out batch of its own evaluates to keep in step with the others)
        self.val_filler = next(iter(ValLoader(self.dataset, batch_size=1, seq_len=S, max_batches=1)))
        val = self.meta["splits"]["val"]
        self.val_bytes_per_token = val["bytes"] / max(val["tokens"], 1)

        torch.manual_seed(t.seed)
        self.model = DeepSeekForCausalLM(self.model_cfg)
        if cfg.model.init_from:
            load_weights(self.model, cfg.model.init_from)
        configure_token_dropping(self.model, cfg.balance.capacity_factor, cfg.balance.no_drop_fraction)
        self.moe_rows = moe_rows(self.model)  # (rows of the expert load, kept for pipeline ranks' pruned models)
        if self.dims.pp > 1:
            self._check_pipelined()

    def _document_cuts(self) -> dict:
        """Where data.document_mask cuts: before each BOS if the documents start with one, else after each EOS."""
        shards = TokenSplit(self.dataset, "train").shards  # (memory maps: only the first token is read)
        first = shards[0][:1].tolist() if shards else []
        if self.tok.bos_id is not None and first == [self.tok.bos_id]:
            return {"bos_id": self.tok.bos_id}
        if self.tok.eos_id is None:
            raise ValueError(f"data.document_mask: {self.dataset}'s tokenizer has neither a BOS that starts its "
                             "documents nor an EOS that ends them, so documents cannot be told apart")
        return {"eos_id": self.tok.eos_id}

    def inputs(self, ids: torch.Tensor) -> dict:
        """The model's arguments for input ids [B, S]: with data.document_mask, the mask too."""
        if self.cuts is None:
            return {"input_ids": ids}
        return {"input_ids": ids, "attention_mask": document_mask(ids, **self.cuts)}

    def _check_pipelined(self) -> None:
        cfg, t, M = self.cfg, self.cfg.train, self.dims.microbatches
        local = t.batch_size // self.dp_size
        if t.micro_batch_size and t.micro_batch_size != local:
            raise ValueError(f"train.micro_batch_size = {t.micro_batch_size}: with parallel.pp > 1 the pipeline "
                             "cuts each rank's batch into parallel.microbatches; leave it 0")
        if local % M:
            raise ValueError(f"parallel.microbatches = {M} must divide each rank's batch, train.batch_size / "
                             f"data-parallel ranks = {local}")
        if cfg.schedule.batch_ramp_start:
            raise ValueError("schedule.batch_ramp_* with parallel.pp > 1: the pipeline's micro-batch shapes are fixed")
        if cfg.data.document_mask:
            raise ValueError("data.document_mask with parallel.pp > 1: the pipeline's stages take no attention mask")
        if self.loss_hook is not None or cfg.balance.capacity_factor:
            raise ValueError("with parallel.pp > 1 there is no loss hook and no token dropping (balance.capacity_factor)")

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict:
        return {"tokens_seen": self.tokens_seen, "loader": self.train_loader.state_dict(),
                "scheduler": {"name": self.cfg.schedule.lr_schedule, "step": self.step, "lr": self.lr},
                "dataset": os.fspath(self.dataset)}

    def load_extra_state(self, state: dict) -> None:
        self.tokens_seen = int(state["tokens_seen"])
        self.train_loader.load_state_dict(state["loader"])

    def data_state(self) -> dict:
        return self.train_loader.state_dict()

    def load_data_state(self, state: dict) -> None:
        self.train_loader.load_state_dict(state)

    # ------------------------------------------------------------------ one step
    def micro_batches(self) -> int:
        batch = self.cfg.train.batch_size if self.batch_ramp is None else self.batch_ramp(self.tokens_seen)
        return batch // (self.micro_batch * self.dp_size)

    def train_step(self) -> dict:
        """One optimizer step (or a skipped one); returns its metrics record."""
        cfg = self.cfg
        step, S, D = self.step, self.seq_len, self.depth
        n_micro = self.micro_batches()
        mtp_weight = self.mtp_schedule(step)
        bias_speed = self.bias_schedule(step)
        pass_ = self._micro_batches if self.pipeline is None else self._pipelined
        sums, mtp_depths, load, dropped = pass_(n_micro, mtp_weight)
        sums = self.reduce_values(sums)  # (every rank then judges the same global loss)
        if load is not None:
            load = self.reduce(load)  # the global batch's load: every rank moves its biases alike
        grad_norm = self.optimizer_step(sums["total_loss"])
        if not self.skipped and load is not None and bias_speed:
            mine = [self.moe_rows[id(m)] for m in self.model.moe_layers()]  # (a pipeline rank's layers)
            update_biases(self.model, load[mine], bias_speed, cfg.balance.center_bias)

        batch = n_micro * self.micro_batch * self.dp_size
        self.tokens_seen += batch * S
        record = {**sums, "grad_norm": grad_norm, "mtp_weight": mtp_weight, "tokens": self.tokens_seen,
                  "batch_size": batch}
        if D > 1:
            record["mtp_loss_per_depth"] = self.reduce(torch.tensor(mtp_depths), "mean").tolist()
        if load is not None:
            record.update(load_summary(load))
            record["bias_update_speed"] = bias_speed
            record.update(bias_stats(self.model))
            if cfg.balance.expert_load_every and (step + 1) % cfg.balance.expert_load_every == 0:
                record["expert_load"] = load.tolist()
        if self.dims.ep > 1:  # hidden-state bytes the dispatch and combine all-to-alls sent between ranks
            sent = self.reduce(torch.tensor(take_sent_bytes(self.model)), over="pp")
            record["alltoall_bytes"] = int(self.reduce(sent))
        if dropped is not None:
            record["dropped_fraction"] = float(self.reduce(torch.tensor(dropped), "mean"))
        return record

    def _micro_batches(self, n_micro: int, mtp_weight: float):
        """Forward and backward of the step's micro-batches: (loss sums, MTP loss per depth, expert load,
        dropped fraction of the last micro-batch)."""
        step, S, D = self.step, self.seq_len, self.depth
        sums = {"loss": 0.0, "mtp_loss": 0.0, "aux_loss": 0.0, "total_loss": 0.0}
        mtp_depths = [0.0] * D
        load = None
        for micro in range(n_micro):
            window = next(self.train_loader).to(self.device, non_blocking=True)
            with self.autocast():
                out = self.forward(**self.inputs(model_inputs(window, S, D)))
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
        return sums, mtp_depths, load, drop_fraction(out)

    def _pipelined(self, n_micro: int, mtp_weight: float):
        """`_micro_batches` through the pipeline schedule: this rank's batch, cut into parallel.microbatches,
        forward and backward over the stages; the last stage's loss parts and every stage's expert load are
        summed over the pipeline ranks, so each holds the step's numbers."""
        S, D = self.seq_len, self.depth
        window = next(self.train_loader).to(self.device, non_blocking=True)
        self._mtp_weight, self._parts = mtp_weight, []
        with self.autocast():
            self.pipeline.step(model_inputs(window, S, D), window)
        parts = self._parts[-self.dims.microbatches:]  # (see Pipeline.step)
        parts = torch.tensor(parts).mean(0) if parts else torch.zeros(4 + D, dtype=torch.float64)
        parts = self.reduce(parts, over="pp").tolist()
        sums = dict(zip(("loss", "mtp_loss", "aux_loss", "total_loss"), parts[:4]))
        load = None
        if self.moe_rows:
            load = self.reduce(self.pipeline.expert_load(self.model_cfg.n_routed_experts).to(self.device), over="pp")
        return sums, parts[4:], load, None

    def pipeline_loss(self, outputs: tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor:
        """A micro-batch's L = L_main + λ/D Σ_k L_k + balance losses from the last stage's (logits, *mtp_logits,
        aux)."""
        S = self.seq_len
        main, mtp = lm_losses(SimpleNamespace(logits=outputs[0], mtp_logits=list(outputs[1:-1])), target, S)
        aux = outputs[-1].sum()
        loss = total_loss(main, mtp, self._mtp_weight, aux)
        mtp_mean = torch.stack(mtp).mean() if mtp else torch.zeros(())
        self._parts.append([main.item(), mtp_mean.item(), aux.item(), loss.item(), *(m.item() for m in mtp)])
        return loss

    def _train_step(self, log) -> dict:
        record = super()._train_step(log)
        tokens_per_s = record["batch_size"] * self.seq_len / record["step_time"]
        record.update(tokens_per_s=tokens_per_s, mfu=tokens_per_s * self.flops_per_token / self.peak_flops)
        return record

    @property
    def peak_flops(self) -> float:
        if self._peak is None:
            self._peak = measure_matmul_peak(torch.bfloat16 if self.cfg.train.dtype == "bf16" else torch.float32,
                                             device=self.device)
        return self._peak

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out loss, bits per byte and MaxVio_global (expert load summed over the evaluated set)."""
        model = self.model if self.pipeline is None else self._whole_model()
        model.eval()
        try:
            nll, count, load = self._eval_pass(model)
        finally:
            self.model.train()
        nll, count = self.reduce(torch.tensor([nll, count], dtype=torch.float64)).tolist()
        # bits per byte = nats per token / ln 2 × tokens per byte of the held-out text (metadata.json)
        val_loss = nll / count
        record = {"val_loss": val_loss, "val_bpb": val_loss / math.log(2) / self.val_bytes_per_token,
                  "val_tokens": int(count)}
        if load is not None:
            load = self.reduce(load)
            vio = max_violation(load)
            record.update({"max_vio_global": [round(v, 4) for v in vio.tolist()],
                           "max_vio_global_mean": float(vio.mean()), "val_expert_load": load.tolist()})
        return record

    def _eval_pass(self, model) -> tuple[float, int, torch.Tensor | None]:
        """Held-out (nll, targets, expert load) of this data-parallel rank."""
        nll, count, load = 0.0, 0, None
        for window, counted in self.lockstep(self.val_loader, filler=self.val_filler):
            window = window.to(self.device, non_blocking=True)
            with self.autocast():
                out = model(**self.inputs(window[:, :-1]), mtp=False)
            if load is None and out.expert_load is not None:
                load = torch.zeros_like(out.expert_load)  # (on every rank: the load is reduced after)
            if not counted:
                continue
            targets = window[:, 1:]
            nll += F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").item()
            count += targets.numel()
            if load is not None:
                load += out.expert_load
        return nll, count, load

    def _whole_model(self) -> DeepSeekForCausalLM:
        """The whole model, gathered from the pipeline ranks (and their shards) onto every rank, for evaluation:
        it runs each rank's held-out share in one forward, as without pipelining (schedules such as DualPipeV
        have no forward-only mode). At nanoseek's scale the copy is cheap; at V3's it would be the pipeline's."""
        model = DeepSeekForCausalLM(self.model_cfg)
        model.load_state_dict(full_model_state(self.model, self.pp_group, everywhere=True))
        return fastpath.enable(model).to(self.device)


    def summarize(self, records: list[dict]) -> dict:
        last_eval = next((r for r in reversed(records) if "val_loss" in r), {})
        return {"tokens": self.tokens_seen,
                **{k: v for k, v in last_eval.items() if k.startswith(("val_", "max_vio_global"))}}


def pretrain(cfg: PretrainConfig, out_dir: str | os.PathLike, *, resume: bool = False,
             loss_hook: LossHook | None = None, progress: bool | None = None) -> dict:
    """Pretrain per `cfg` into `out_dir` (metrics.jsonl, checkpoints/, model/, config.toml, summary.json)."""
    return Pretrainer(cfg, out_dir, resume=resume, loss_hook=loss_hook, progress=progress).run()
