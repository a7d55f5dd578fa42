"""`nanoseek demo`: the DeepSeek recipe end to end at micro scale, with a report.

Stages (each in OUT/NN-name; a finished stage is reused when the command runs again, an interrupted
one resumes from its last checkpoint):

1. data        a chat corpus of bilingual additions (nanoseek.tasks.bilingual: "add 12 and 79:" in
               English or a made-up language) written the way a pretraining corpus holds such text:
               some with a column-by-column <think> trace (half of those in the other language),
               most with a bare, often wrong answer; a byte-level BPE trained on it
               (nanoseek.data.tokenizer) and memory-mapped token shards (nanoseek.data.shards)
2. pretrain    a DeepSeek-V3-style model (MLA, DeepSeekMoE with a shared expert, aux-loss-free
               balancing, MTP) pretrained on those shards (nanoseek.pretrain.trainer); evaluated as the
               base: it reasons sometimes, answers at once mostly, and is right only sometimes
3. r1-zero     GRPO straight on the base with the accuracy reward (nanoseek.recipes.r1 "r1-zero")
4. r1          cold start -> reasoning RL -> rejection sampling + SFT -> all-scenario RL ("r1")
5. distill     a smaller dense student trained on the R1 model's rejection-sampled traces
6. speculative MTP speculative decoding on the base and the R1 model: acceptance and speed-up
7. report      OUT/report.md (+ report.json, plots/*.png)

    nanoseek demo                      # ~15 minutes on 2 CPU cores
    nanoseek demo --quick --out runs/demo-quick
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from nanoseek.data.shards import prepare
from nanoseek.data.tokenizer import load_tokenizer, train_tokenizer
from nanoseek.eval.tasks import evaluate_task
from nanoseek.infer.engine import Engine
from nanoseek.interop.hf import load_pretrained
from nanoseek.parallel.mesh import barrier, main_first, rank
from nanoseek.posttrain.config import PostConfig
from nanoseek.posttrain.distill import distill
from nanoseek.posttrain.sft import task_sft_rows
from nanoseek.posttrain.trainer import eval_examples, read_summary
from nanoseek.pretrain.config import PretrainConfig
from nanoseek.pretrain.trainer import pretrain
from nanoseek.recipes.r1 import load_pipeline_config, plan, run_pipeline
from nanoseek.recipes.report import write_report
from nanoseek.tasks import make_task
from nanoseek.train.checkpoint import latest_checkpoint
from nanoseek.utils import atomic_write_text, torch_threads

TASK = "bilingual"
TEMPLATE = "chat"
# The corpus mix (shares of documents): correct reasoning in the prompt's language, correct reasoning in
# the other language (R1-Zero's language mixing), and answers without reasoning that drop the carry.
STYLES = {"think": 0.15, "switched": 0.15, "buggy": 0.7}


@dataclass(frozen=True)
class Plan:
    """The sizes of one demo mode."""

    docs: int                 # corpus documents (chats)
    vocab_size: int           # BPE tokens
    pretrain_steps: int
    pretrain_batch: int       # sequences of 128 tokens
    r1_zero_steps: int        # GRPO steps of R1-Zero
    r1_steps: dict            # the R1 stages' sizes: cold_start / reasoning_rl / sft / rl steps, rejection prompts
    distill_prompts: int      # teacher prompts sampled for the student's traces; 0: the R1 pipeline's
                              # rejection-sampled data instead (R1 §2.4 distills on those)
    distill_steps: int
    eval_examples: int        # held-out problems per evaluation
    eval_k: int               # samples per problem for pass@1 / cons@k
    spec_prompts: int         # prompts in the speculative-decoding measurement
    styles: dict = field(default_factory=lambda: dict(STYLES))  # the corpus mix
    spec_reps: int = 3        # timed repetitions of the speculative-decoding measurement
    document_mask: bool = False  # pretrain with attention kept inside each packed chat (data.document_mask)
    distill_eval_at_start: bool = True  # also evaluate the untrained student


PLANS = {
    "full": Plan(docs=60_000, vocab_size=300, pretrain_steps=1200, pretrain_batch=32, r1_zero_steps=60,
                 r1_steps={"cold_start": 40, "reasoning_rl": 30, "rejection": 1000, "sft": 100, "rl": 30},
                 distill_prompts=4000, distill_steps=600, eval_examples=200, eval_k=4, spec_prompts=16),
    # Every stage still shows its effect, from a smaller budget (issue 20, docs/LOG.md): a corpus richer in
    # traces (40% instead of 30%, still a minority, so the base answers greedily without reasoning) and 1000
    # short pretraining steps with attention kept inside each packed chat (data.document_mask). Without the
    # mask a trace must find its own prompt's tens digits among the previous chats' in the window: that skill
    # arrived abruptly at a step that seed and thread count decided (some runs never within 1000 steps; LR,
    # schedule, width, MTP, weight decay and data mix only moved which runs missed); with it, it is learned
    # gradually by step ~800. Then enough RL and SFT steps for each stage to move its numbers (R1's SFT and
    # final RL at 40 and 8 steps left it 5 points under R1-Zero for seed 2; 80 and 20 reach it), and a student
    # given 1000 teacher prompts and 300 steps (on the R1 pipeline's ~300 rejection samples for 150 steps it
    # reached only 6%).
    "quick": Plan(docs=8_000, vocab_size=300, pretrain_steps=1000, pretrain_batch=16, r1_zero_steps=20,
                  r1_steps={"cold_start": 40, "reasoning_rl": 8, "rejection": 300, "sft": 80, "rl": 20},
                  distill_prompts=1000, distill_steps=300, eval_examples=100, eval_k=2, spec_prompts=4,
                  styles={"think": 0.2, "switched": 0.2, "buggy": 0.6}, spec_reps=1, distill_eval_at_start=False,
                  document_mask=True),
}
STAGES = ("data", "pretrain", "r1-zero", "r1", "distill", "speculative", "report")


class Demo:
    def __init__(self, out: str | os.PathLike = "runs/demo", quick: bool = False, seed: int = 0, threads: int = 0,
                 progress: bool = True, log=print):
        self.out = Path(out)
        self.mode = "quick" if quick else "full"
        self.plan = PLANS[self.mode]
        self.seed, self.threads, self.progress, self.log = seed, threads, progress, log
        self.state_file = self.out / "demo.json"
        self.state = self._load_state()

    # ------------------------------------------------------------------ bookkeeping
    def _load_state(self) -> dict:
        fresh = {"mode": self.mode, "seed": self.seed, "plan": asdict(self.plan), "stages": {}}
        if not self.state_file.is_file():
            return fresh
        state = json.loads(self.state_file.read_text(encoding="utf-8"))
        if (state.get("mode"), state.get("seed"), state.get("plan")) != (self.mode, self.seed, asdict(self.plan)):
            raise ValueError(f"{self.out} holds a demo run with mode={state.get('mode')!r} seed={state.get('seed')!r}; "
                             f"this one is mode={self.mode!r} seed={self.seed!r}: use another --out, or delete "
                             f"{self.out} to start over")
        return state

    def _save_state(self) -> None:
        if not rank():  # (under torchrun every rank runs the demo; rank 0 keeps the books)
            atomic_write_text(self.state_file, json.dumps(self.state, indent=1) + "\n")

    def _stage(self, index: int, name: str, fn) -> dict:
        """Run stage `name` once: its result and wall time are kept in OUT/demo.json and reused later."""
        done = self.state["stages"].get(name)
        header = f"== {index}/{len(STAGES)} {name}"
        if done is not None:
            self.log(f"{header}: finished earlier ({done['wall_time']:.0f} s), reused")
            return done["result"]
        self.log(f"{header}")
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception as e:
            self.log(f"demo stage {name!r} failed after {time.perf_counter() - t0:.0f} s: {e}\n"
                     f"(fix the cause and run the same command again: what {self.out} holds is reused)")
            raise
        self.state["stages"][name] = {"result": result, "wall_time": time.perf_counter() - t0}
        self._save_state()
        return result

    def plan_text(self) -> str:
        """Which plan ran; for quick, that its numbers come from a smaller budget than the full demo's."""
        p = self.plan
        r1 = " / ".join(f"{k} {v}" for k, v in p.r1_steps.items())
        sizes = (f"{p.docs:,} corpus chats, {p.pretrain_steps} pretraining steps of {p.pretrain_batch} sequences, "
                 f"{p.r1_zero_steps} R1-Zero GRPO steps, R1 stages {r1} (steps; rejection: prompts), "
                 f"{p.distill_steps} distillation steps, {p.eval_examples} held-out problems per evaluation")
        if self.mode != "quick":
            return f"**Plan: full** ({sizes})."
        f = PLANS["full"]
        return (f"**Plan: quick** ({sizes}). Its numbers come from a smaller budget than the full demo's "
                f"(`nanoseek demo`: {f.pretrain_steps} pretraining steps of {f.pretrain_batch} sequences, "
                f"{f.r1_zero_steps} R1-Zero steps, {f.distill_steps} distillation steps, {f.eval_examples} held-out "
                f"problems) and a corpus richer in reasoning traces ({mix(p.styles)} vs {mix(f.styles)}), pretrained with "
                f"attention kept inside each chat (the full demo packs them without a mask, as DeepSeek-V3 does): "
                f"every stage shows its effect, but the accuracies are lower and noisier than the full demo's.")

    def path(self, name: str) -> Path:
        return self.out / f"{STAGES.index(name) + 1:02d}-{name}"

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        self.state["started"] = self.state.get("started") or time.strftime("%Y-%m-%d %H:%M:%S")
        t0 = time.perf_counter()
        with torch_threads(self.threads):
            self.state["threads"] = torch.get_num_threads()
            steps = {"data": self.data, "pretrain": self.pretrain, "r1-zero": self.r1_zero, "r1": self.r1,
                     "distill": self.distill, "speculative": self.speculative}
            results = {name: self._stage(i, name, fn) for i, (name, fn) in enumerate(steps.items(), 1)}
        self.log(f"== {len(STAGES)}/{len(STAGES)} report")

        report = write_report(self, results) if not rank() else {}
        barrier()
        self.log(f"\nwrote {self.out / 'report.md'} ({time.perf_counter() - t0:.0f} s this time)")
        final = results["r1"]["final_model"]
        self.log(f"chat with the R1 model:   nanoseek chat --model {final}   (try: add 12 and 79:)\n"
                 f"serve it (OpenAI API):    nanoseek serve --model {final} --port 8000")
        return report

    def data(self) -> dict:
        return main_first(self._data)  # (under torchrun rank 0 builds it, the other ranks reuse it)

    def _data(self) -> dict:
        d = self.path("data")
        d.mkdir(parents=True, exist_ok=True)
        corpus = d / "corpus.jsonl"
        if not corpus.is_file():
            # Train-split problems only: the held-out ones never appear in pretraining.
            rows = task_sft_rows(make_task(TASK), self.plan.docs, seed=self.seed, styles=self.plan.styles,
                                  tag_bare=True)
            chats = [{"messages": [{"role": "user", "content": r["prompt"]},
                                   {"role": "assistant", "content": r["completion"]}]} for r in rows]
            atomic_write_text(corpus, "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats))
        tok_dir = d / "tokenizer"
        tok = (load_tokenizer(tok_dir) if (tok_dir / "tokenizer.json").is_file() else
               train_tokenizer(corpus, self.plan.vocab_size, tok_dir, seed=self.seed, progress=False))
        tokens = d / "tokens"
        if not (tokens / "metadata.json").is_file():
            prepare(corpus, tok, tokens, val_fraction=0.02, seed=self.seed, progress=self.progress)
        meta = json.loads((tokens / "metadata.json").read_text(encoding="utf-8"))
        splits = {name: s["tokens"] for name, s in meta["splits"].items()}
        self.log(f"{self.plan.docs:,} chats -> {corpus}; {tok.vocab_size}-token BPE; token shards {splits}")
        return {"corpus": os.fspath(corpus), "tokenizer": os.fspath(tok_dir), "dataset": os.fspath(tokens),
                "docs": self.plan.docs, "vocab_size": tok.vocab_size, "tokens": splits}

    def pretrain_config(self) -> PretrainConfig:
        p = self.plan
        vocab = self.state["stages"]["data"]["result"]["vocab_size"]
        return PretrainConfig.from_dict({
            # tiny-v3's balance: the V3 sequence-wise loss (seq_aux_alpha 1e-4) with the aux-loss-free bias update
            "model": {"preset": "tiny-v3", "overrides": {"vocab_size": vocab}},
            "data": {"dataset": os.fspath(self.path("data") / "tokens"), "seq_len": 120,
                     "document_mask": p.document_mask},
            "optim": {"lr": 3e-3},
            # DeepSeek LLM's multi-step schedule: the full rate for 80% of the run, then x0.316 and x0.1.
            "schedule": {"lr_schedule": "deepseek-multistep", "warmup_steps": 20},
            # γ = 0.01 instead of V3's 0.001: V3's value serves ~10^5 steps, this run has ~10^3 (docs/LOG.md).
            "balance": {"bias_update_speed": 0.01, "expert_load_every": max(p.pretrain_steps // 50, 1)},
            "mtp": {"weight": 0.3, "weight_after": 0.1},
            "train": {"steps": p.pretrain_steps, "batch_size": p.pretrain_batch, "dtype": "fp32", "seed": self.seed,
                      "threads": self.threads},
            "eval": {"every": max(p.pretrain_steps // 10, 1), "batches": 4, "batch_size": 32},
            "checkpoint": {"every": max(p.pretrain_steps // 4, 1), "keep": 1},
            "log": {"progress": self.progress, "tensorboard": False},
        }).validate()

    def pretrain(self) -> dict:
        d = self.path("pretrain")
        summary = pretrain(self.pretrain_config(), d, resume=latest_checkpoint(d) is not None)
        base = self.evaluate(summary["model_dir"])
        self.log(f"base model: {line(base)}")
        return {**summary, "eval": base}

    # ------------------------------------------------------------------ post-training
    def common_overrides(self) -> list[str]:
        p = self.plan
        return [f"pipeline.base={self.path('pretrain') / 'model'}", f"pipeline.seed={self.seed}",
                f"pipeline.threads={self.threads}", f"pipeline.eval_examples={p.eval_examples}",
                f"pipeline.eval_k={p.eval_k}", f"pipeline.progress={str(self.progress).lower()}",
                f"common.task.name={TASK}", f'common.task.options.template="{TEMPLATE}"',
                "common.grpo.beta=0.001",  # R1's KL coefficient (loads a reference model; 0 would skip it)
                "common.eval.max_new_tokens=64", "common.grpo.max_new_tokens=64", "common.rejection.max_new_tokens=64"]

    def r1_zero_overrides(self) -> list[str]:
        return self.common_overrides() + [f"rl.train.steps={self.plan.r1_zero_steps}"]

    def r1_overrides(self) -> list[str]:
        s = self.plan.r1_steps
        return self.common_overrides() + [
            f"cold_start.train.steps={s['cold_start']}", f"reasoning_rl.train.steps={s['reasoning_rl']}",
            f"rejection.rejection.prompts={s['rejection']}", f"sft.train.steps={s['sft']}", f"rl.train.steps={s['rl']}"]

    def r1_zero(self) -> dict:
        return run_pipeline("r1-zero", self.path("r1-zero"), overrides=self.r1_zero_overrides(), log=self.log)

    def r1(self) -> dict:
        return run_pipeline("r1", self.path("r1"), overrides=self.r1_overrides(), log=self.log)

    def distill_config(self):
        p = self.plan
        r1 = self.state["stages"]["r1"]["result"]
        if p.distill_prompts:
            traces = [f"rejection.prompts={p.distill_prompts}", "rejection.samples=1", "rejection.max_new_tokens=64"]
        else:
            rejection = next(s["dir"] for s in r1["stages"] if s["command"] == "rejection")
            traces = [f"distill.traces={json.dumps(os.path.join(rejection, 'data.jsonl'))}"]
        return PostConfig.load(None, [
            # The student: a dense Llama-layout model (GQA) with 2 layers, smaller than the teacher's active part.
            f"distill.teacher={r1['final_model']}", "model.preset=tiny-dense", "model.overrides.num_hidden_layers=2",
            f"task.name={TASK}", f'task.options.template="{TEMPLATE}"', *traces,
            "optim.lr=3e-3", "schedule.lr_schedule=constant", "schedule.warmup_steps=20",
            f"train.steps={p.distill_steps}", "train.batch_size=64", f"train.seed={self.seed}",
            f"train.threads={self.threads}", f"eval.examples={p.eval_examples}", f"eval.k={p.eval_k}",
            "eval.max_new_tokens=64", f"eval.at_start={str(p.distill_eval_at_start).lower()}",
            f"checkpoint.every={max(p.distill_steps // 4, 1)}",
            f"log.progress={str(self.progress).lower()}"])

    def distill(self) -> dict:
        d = self.path("distill")
        summary = read_summary(d) or distill(self.distill_config(), d, resume=latest_checkpoint(d) is not None)
        self.log(f"student: {line(summary['eval'])}")
        return summary

    # ------------------------------------------------------------------ measurements
    def evaluate(self, model_dir: str | os.PathLike) -> dict:
        """The held-out metrics of a model, on the same problems the pipelines evaluate on."""
        cfg = plan("r1-zero", self.path("r1-zero"), load_pipeline_config("r1-zero", None, self.r1_zero_overrides()))[0].config
        task = cfg.build_task()
        model = load_pretrained(model_dir).eval()
        return evaluate_task(model, load_tokenizer(model_dir), task, eval_examples(cfg, task), k=cfg.eval.k,
                             max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.eval.seed)

    def speculative(self) -> dict:
        models = {"base": self.path("pretrain") / "model", "r1": Path(self.state["stages"]["r1"]["result"]["final_model"])}
        out = {}
        for name, model_dir in models.items():
            out[name] = measure_speculative(model_dir, self.plan.spec_prompts, reps=self.plan.spec_reps, seed=self.seed)
            r = out[name]
            self.log(f"{name}: acceptance {100 * r['acceptance_rate']:.1f}%, {r['tokens_per_forward']:.2f} tokens per "
                     f"forward, {r['speedup']:.2f}x tokens/s, identical greedy tokens: {r['identical']}")
        return out


# ---------------------------------------------------------------------- helpers
def mix(styles: dict) -> str:
    return ", ".join(f"{name} {100 * share:.0f}%" for name, share in styles.items())


def line(metrics: dict) -> str:
    parts = [f"greedy accuracy {100 * metrics['greedy_accuracy']:.1f}%"]
    if "pass@1" in metrics:
        parts.append(f"pass@1 {100 * metrics['pass@1']:.1f}%")
    for key, name in (("language_consistency", "language consistency"), ("think_rate", "<think> use")):
        if key in metrics:
            parts.append(f"{name} {100 * metrics[key]:.1f}%")
    return ", ".join(parts)


def measure_speculative(model_dir, n_prompts: int, new_tokens: int = 48, reps: int = 3, seed: int = 0) -> dict:
    """Greedy decoding of held-out prompts (batch 1) with and without MTP drafts, interleaved."""


    model = load_pretrained(model_dir).eval()
    tok = load_tokenizer(model_dir)
    prompts = [tok.encode(e.prompt, add_bos=True) for e in make_task(TASK, template=TEMPLATE).examples(
        n_prompts, seed=seed + 1, split="test")]
    plain, spec = Engine(model), Engine(model, speculative=True)
    drafted = accepted = gained = row_steps = 0

    def run(engine):
        nonlocal drafted, accepted, gained, row_steps
        t, tokens = time.perf_counter(), []
        for p in prompts:
            tokens.append(engine.generate([p], max_new_tokens=new_tokens)[0].tokens)
            if engine is spec:
                s = engine.stats
                drafted, accepted, gained, row_steps = (drafted + s.drafted, accepted + s.accepted,
                                                        gained + s.tokens, row_steps + s.row_steps)
        return tokens, time.perf_counter() - t

    (a, _), (b, _) = run(plain), run(spec)  # warm-up, and the identity check
    tp, ts = [], []
    for _ in range(reps):
        tp.append(run(plain)[1])
        ts.append(run(spec)[1])
    n = sum(len(t) for t in a)
    return {"acceptance_rate": accepted / max(drafted, 1), "tokens_per_forward": gained / max(row_steps, 1),
            "plain_tokens_per_s": n / statistics.median(tp), "mtp_tokens_per_s": n / statistics.median(ts),
            "speedup": statistics.median(tp) / statistics.median(ts), "identical": a == b, "prompts": n_prompts,
            "tokens": n}


# ---------------------------------------------------------------------- entry point
def run(out: str = "runs/demo", quick: bool = False, seed: int = 0, threads: int = 0, progress: bool = True) -> dict:
    """Run (or resume) the demo into `out`; returns the report dict (also OUT/report.json)."""
    return Demo(out, quick=quick, seed=seed, threads=threads, progress=progress).run()
