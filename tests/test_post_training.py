"""Post-training runs (issue 5): SFT resumes exactly, GRPO raises held-out accuracy from a bimodal base
(R1-Zero at micro scale), DPO on on-policy pairs does too, rejection sampling feeds distillation,
and `nanoseek pipeline r1` runs end to end reporting accuracy and language consistency per stage."""
import json
from pathlib import Path

import pytest
import torch
from post_fixtures import bimodal_base, summary

import nanoseek
from nanoseek.interop.hf import load_pretrained
from nanoseek.posttrain.config import PostConfig
from nanoseek.tasks import make_task
from nanoseek.train.metrics import read_metrics

# The session's bimodal base (tests/post_fixtures.py): 30% <think> traces, 70% tagged dropped-carry answers.
BASE_STEPS, BASE_BATCH = 800, 64
QUIET = ["train.threads=1", "log.progress=false"]
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    return bimodal_base(tmp_path_factory, BASE_STEPS, BASE_BATCH)


def _cfg(*sets):
    return PostConfig.load(None, [*QUIET, *sets])


# ---------------------------------------------------------------- SFT
def test_sft_trains_exports_and_resumes_identically(tmp_path):
    from nanoseek.posttrain.sft import sft

    sets = ["task.name=arithmetic", "task.train_size=400", "data.styles={think=0.5, buggy=0.5}", "train.batch_size=16",
            "model.overrides={num_nextn_predict_layers=0, hidden_size=32}", "eval.examples=8", "eval.max_new_tokens=8",
            "eval.at_start=false", "checkpoint.every=4"]
    full = sft(_cfg(*sets, "train.steps=8"), tmp_path / "full")
    records = [r for r in read_metrics(tmp_path / "full") if r.get("loss") is not None]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[-1]["loss"] < records[0]["loss"]
    assert full["eval"]["n"] == 8 and (tmp_path / "full" / "config.toml").is_file()
    model = load_pretrained(tmp_path / "full" / "model")
    nanoseek.load_tokenizer(tmp_path / "full" / "model")

    sft(_cfg(*sets, "train.steps=4"), tmp_path / "half")
    with pytest.raises(ValueError, match="already holds checkpoints"):
        sft(_cfg(*sets, "train.steps=8"), tmp_path / "half")
    with pytest.raises(ValueError, match=r"cannot resume .*\(optim.lr: 0.001 -> 0.01\)"):
        sft(_cfg(*sets, "train.steps=8", "optim.lr=1e-2"), tmp_path / "half", resume=True)
    sft(_cfg(*sets, "train.steps=8"), tmp_path / "half", resume=True)
    resumed = load_pretrained(tmp_path / "half" / "model")
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert [r["step"] for r in read_metrics(tmp_path / "half") if r.get("loss")] == list(range(1, 9))

    packed = sft(_cfg(*sets, "train.steps=2", "data.pack=true", "data.seq_len=64", "train.batch_size=4"),
                 tmp_path / "packed")
    assert packed["steps"] == 2


def test_sft_on_chat_jsonl_trains_only_assistant_tokens(tmp_path):
    from nanoseek.posttrain.sft import SFTTrainer
    from nanoseek.utils import write_jsonl

    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            for w in ("red", "green", "blue", "cyan")] * 4
    write_jsonl(tmp_path / "chat.jsonl", rows)
    trainer = SFTTrainer(_cfg(f"data.train={json.dumps(str(tmp_path / 'chat.jsonl'))}", "task.name=",
                              "train.steps=80", "train.batch_size=8", "optim.lr=1e-2",
                              "model.overrides={num_nextn_predict_layers=0, hidden_size=32}"), tmp_path / "run")
    ids, mask = trainer.rows[0]
    assert trainer.tok.decode([t for t, m in zip(ids, mask) if m]) == "red<｜end▁of▁sentence｜>"
    out = trainer.run()
    assert out["eval"] is None and out["loss"] < 0.1  # memorised the four replies


# ---------------------------------------------------------------- GRPO: R1-Zero at micro scale
def test_grpo_raises_heldout_accuracy_from_bimodal_base(base, tmp_path):
    """The seeded short-budget version of the acceptance run (`nanoseek experiment r1` measures the curve over seeds)."""
    from nanoseek.posttrain.grpo import grpo

    start = summary(base)["eval"]
    out = grpo(_cfg(f"model.init_from={json.dumps(str(base / 'model'))}", "task.name=arithmetic",
                    "optim.lr=3e-4", "optim.beta2=0.99", "train.steps=12", "eval.examples=100",
                    "eval.max_new_tokens=48", "eval.at_start=false"), tmp_path / "grpo")
    end = out["eval"]
    assert end["greedy_accuracy"] >= start["greedy_accuracy"] + 0.30, (start, end)
    assert end["think_rate"] > start["think_rate"] + 0.3 and end["mean_length"] > start["mean_length"] + 5
    steps = [r for r in read_metrics(tmp_path / "grpo") if r.get("loss") is not None]
    for key in ("reward_mean", "reward_std", "frac_zero_std", "kl", "entropy", "clip_fraction", "response_length",
                "think_rate", "accuracy", "truncated_fraction", "rollout_time", "rollout_tokens_per_s"):
        assert key in steps[-1], key
    assert steps[-1]["reward_mean"] > steps[0]["reward_mean"]
    assert steps[-1]["response_length"] > steps[0]["response_length"]



def test_grpo_on_a_gsm8k_format_file_raises_heldout_accuracy(base, tmp_path):
    """The data-file task in GRPO: tests/data/gsm8k_sums.jsonl holds 300 two-digit sums written as GSM8K rows
    (question "76+63=", answer "<column trace>\n#### 139"; 98 held out by the hash split), rewarded by the
    math verifier. Measured: 18% -> 80% greedy in 12 steps (5 s)."""
    from nanoseek.posttrain.grpo import grpo

    out = grpo(_cfg(f"model.init_from={json.dumps(str(base / 'model'))}", "task.name=file",
                    f'task.options={{path={json.dumps(str(DATA / "gsm8k_sums.jsonl"))}, test_fraction=0.3}}',
                    "optim.lr=3e-4", "optim.beta2=0.99", "train.steps=12", "eval.examples=100",
                    "eval.max_new_tokens=48"), tmp_path / "grpo")
    start, end = out["start_eval"], out["eval"]
    assert end["greedy_accuracy"] >= start["greedy_accuracy"] + 0.30, (start, end)

def test_grpo_kl_reference_mu_and_resume(base, tmp_path):
    from nanoseek.posttrain.grpo import grpo

    sets = [f"model.init_from={json.dumps(str(base / 'model'))}", "task.name=arithmetic", "grpo.prompts_per_step=4",
            "grpo.group_size=4", "grpo.beta=0.04", "grpo.mu=2", "grpo.ref_reset_every=2", "grpo.epsilon_high=0.28",
            "grpo.aggregation=sequence", "grpo.advantage_scale=batch", "grpo.mask_truncated=true",
            "optim.lr=1e-3", "eval.examples=4", "eval.max_new_tokens=8", "checkpoint.every=2"]
    grpo(_cfg(*sets, "train.steps=2"), tmp_path / "run")
    assert (tmp_path / "run" / "reference" / "config.json").is_file()
    out = grpo(_cfg(*sets, "train.steps=4"), tmp_path / "run", resume=True)
    assert out["steps"] == 4
    steps = [r for r in read_metrics(tmp_path / "run") if r.get("loss") is not None]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[0]["kl"] == 0.0 and steps[1]["kl"] > 0  # the policy moved away from the reference
    assert steps[2]["kl"] == 0.0  # reset at step 2: the reference is the policy again
    assert all("clip_fraction_last" in r for r in steps)  # μ = 2: the second pass is clipped against the sampler


# ---------------------------------------------------------------- DPO
def test_dpo_on_policy_pairs_raise_heldout_accuracy(base, tmp_path):
    from nanoseek.posttrain.dpo import dpo

    start = summary(base)["eval"]
    # sigmoid DPO + NLL on the chosen (IRPO), three epochs over ~200 pairs: plain DPO overfits them and is
    # fragile at this size (docs/LOG.md: 16% -> 49% on one machine, no gain on another)
    out = dpo(_cfg(f"model.init_from={json.dumps(str(base / 'model'))}", "task.name=arithmetic", "dpo.prompts=256",
                   "dpo.samples=8", "dpo.beta=0.1", "dpo.nll_weight=1", "optim.lr=1e-4", "train.steps=24", "train.batch_size=32",
                   "eval.examples=100", "eval.max_new_tokens=48", "eval.at_start=false"), tmp_path / "dpo")
    assert out["pairs"]["pairs"] >= 100
    assert out["eval"]["greedy_accuracy"] >= start["greedy_accuracy"] + 0.15, (start, out["eval"])
    assert out["eval"]["think_rate"] > start["think_rate"]
    steps = [r for r in read_metrics(tmp_path / "dpo") if r.get("loss") is not None]
    assert steps[-1]["reward_accuracy"] > 0.5 and steps[-1]["margin"] > steps[0]["margin"]
    assert (tmp_path / "dpo" / "pairs.jsonl").is_file() and (tmp_path / "dpo" / "reference_logps.safetensors").is_file()


# ---------------------------------------------------------------- rejection sampling and distillation
def test_rejection_sampling_feeds_logit_distillation_of_a_smaller_student(base, tmp_path):
    from nanoseek.posttrain.distill import distill
    from nanoseek.posttrain.rejection import rejection_sample_run
    from nanoseek.utils import read_jsonl

    teacher = str(base / "model")
    stats = rejection_sample_run(_cfg(f"model.init_from={json.dumps(teacher)}", "task.name=arithmetic",
                                      "rejection.prompts=32", "rejection.samples=4", "rejection.temperature=1.0",
                                      "rejection.max_new_tokens=40"), tmp_path / "rs")
    rows = read_jsonl(tmp_path / "rs" / "data.jsonl")
    assert stats["kept"] == len(rows) > 0 and stats["samples"] == 128
    task = make_task("arithmetic")
    for r in rows:
        ex = next(e for e in task.examples(32, seed=7) if e.prompt == r["prompt"])
        assert task.is_correct(ex, r["completion"]) and r["completion"].startswith("<think>")

    # the traces as another tool writes them (its own column names), read through data.fields
    traces = tmp_path / "traces-qa.jsonl"
    traces.write_text("".join(json.dumps({"question": r["prompt"], "answer": r["completion"]}) + "\n" for r in rows))
    out = distill(_cfg(f"distill.teacher={json.dumps(teacher)}", f"distill.traces={json.dumps(str(traces))}",
                       'data.fields={prompt = "question", completion = "answer"}', "distill.logit_weight=1.0", "distill.temperature=2.0", "task.name=arithmetic",
                       "model.overrides={num_nextn_predict_layers=0, hidden_size=32, num_hidden_layers=2}",
                       "train.steps=6", "train.batch_size=8", "eval.examples=4", "eval.max_new_tokens=8"),
                  tmp_path / "distill")
    steps = [r for r in read_metrics(tmp_path / "distill") if r.get("loss") is not None]
    assert steps[-1]["distill_kl"] < steps[0]["distill_kl"]
    student = load_pretrained(tmp_path / "distill" / "model")
    teacher_cfg = nanoseek.ModelConfig.from_pretrained(teacher)
    assert student.config.hidden_size == 32 and student.config.vocab_size == teacher_cfg.vocab_size
    assert out["traces"]["kept"] == len(rows)


def test_the_prompt_format_is_recorded_and_followed(tmp_path, monkeypatch):
    """Issue 17.4: a model trained on a task's chat prompts ending in <think> is evaluated, sampled from and
    served that way without being told again."""
    import argparse

    from nanoseek.eval import cli as eval_cli
    from nanoseek.infer.cli import thinking
    from nanoseek.posttrain.sft import sft

    sft(_cfg("task.name=arithmetic", "task.options={template=\"chat\", prefill_think=true}", "task.train_size=64",
             "train.batch_size=8", "train.steps=2", "model.overrides={num_nextn_predict_layers=0, hidden_size=32}",
             "eval.examples=4", "eval.max_new_tokens=4", "eval.at_start=false"), tmp_path / "run")
    model_dir = tmp_path / "run" / "model"
    tok = nanoseek.load_tokenizer(model_dir)
    assert tok.prompt_format == {"template": "chat", "prefill_think": True}
    seen = []
    monkeypatch.setattr(eval_cli, "evaluate", lambda model, tok, task, examples, cfg, **kw: seen.append(task) or {})
    eval_cli.evaluate_model(model_dir, _cfg("task.name=arithmetic", "eval.examples=4"))
    assert (seen[0].template, seen[0].prefill_think) == ("chat", True)
    eval_cli.evaluate_model(model_dir, _cfg("task.name=arithmetic", "eval.examples=4", "task.options={template=\"plain\"}"))
    assert (seen[1].template, seen[1].prefill_think) == ("plain", True)  # what the config says wins
    assert thinking(argparse.Namespace(thinking=None), tok) is True
    assert thinking(argparse.Namespace(thinking=False), tok) is False


# ---------------------------------------------------------------- nanoseek eval
def test_eval_cli_reports_greedy_and_sampled_metrics(base, tmp_path, capsys):
    from nanoseek.cli import main

    main(["eval", "--model", str(base / "model"), "--task", "arithmetic", "--examples", "20", "--k", "4",
          "--set", "eval.max_new_tokens=48", "--set", "train.threads=1", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "eval.json").read_text())
    for key in ("greedy_accuracy", "format_rate", "think_rate", "mean_length", "pass@1", "pass@4", "cons@4"):
        assert key in result and key in printed, key
    assert result["n"] == 20 and result["pass@4"] >= result["pass@1"]


# ---------------------------------------------------------------- the pipelines
def test_pipeline_r1_zero_stages_resume_and_refuse_changed_configs(tmp_path):
    from nanoseek.recipes.r1 import run_pipeline

    sets = ["common.train.threads=1", "pipeline.progress=false", "pipeline.eval_examples=8", "pipeline.check_base=false",
            "common.eval.max_new_tokens=8", "common.grpo.max_new_tokens=8", "base.train.steps=10",
            "base.train.batch_size=16", "base.task.train_size=200", "rl.grpo.prompts_per_step=2",
            "rl.grpo.group_size=2", "common.checkpoint.every=1"]
    lines = []
    first = run_pipeline("r1-zero", tmp_path / "z", overrides=[*sets, "rl.train.steps=2"], log=lines.append)
    assert [r["stage"] for r in first["stages"]] == ["base", "rl"] and first["stages"][1]["steps"] == 2
    lines.clear()
    more = run_pipeline("r1-zero", tmp_path / "z", overrides=[*sets, "rl.train.steps=3"], log=lines.append)
    assert "reused" in lines[0] and "resuming" in lines[2] and more["stages"][1]["steps"] == 3
    assert [r["step"] for r in read_metrics(tmp_path / "z" / "02-rl") if r.get("loss") is not None] == [1, 2, 3]
    with pytest.raises(ValueError, match=r"stage 'rl' .* another config \(grpo.beta"):
        run_pipeline("r1-zero", tmp_path / "z", overrides=[*sets, "rl.train.steps=3", "rl.grpo.beta=0.1"])



def test_pipeline_r1_zero_on_a_data_file_from_a_given_base(base, tmp_path):
    """Issue 17.1: the R1-Zero pipeline on a user's GSM8K-format file, starting from an existing base."""
    from nanoseek.recipes.r1 import run_pipeline

    path = json.dumps(str(DATA / "gsm8k_sums.jsonl"))
    out = run_pipeline("r1-zero", tmp_path / "z", overrides=[
        "common.train.threads=1", "pipeline.progress=false", "pipeline.eval_examples=8",
        f"pipeline.base={json.dumps(str(base / 'model'))}", "common.task.name=file",
        f"common.task.options={{path={path}, test_fraction=0.3}}", "rl.grpo.prompts_per_step=2",
        "rl.grpo.group_size=2", "rl.train.steps=2"], log=lambda line: None)
    rl = out["stages"][-1]
    assert rl["stage"] == "rl" and rl["steps"] == 2 and 0.0 <= rl["greedy_accuracy"] <= 1.0
    assert [r["stage"] for r in out["stages"]] == ["rl"]  # the given base replaces the base stage
    assert "name = \"file\"" in (tmp_path / "z" / "01-rl" / "config.toml").read_text()


def test_pipeline_r1_zero_stops_when_the_base_never_reasons(tmp_path):
    """Issue 18.11: a base trained only on shortcut answers gives R1-Zero nothing to reinforce; the pipeline
    says so, with the probe's numbers and what to change, instead of running RL to no effect."""
    from nanoseek.recipes.r1 import run_pipeline

    with pytest.raises(ValueError, match=r"sometimes reasons.* of 256 sampled completions open <think>, 0\.0% of "
                                         r"those are right.*base\.train\.steps"):
        run_pipeline("r1-zero", tmp_path / "z", overrides=[
            "common.train.threads=1", "pipeline.progress=false", "pipeline.eval_examples=8",
            "base.data.styles={shortcut=1.0}", "base.train.steps=30", "base.train.batch_size=16",
            "base.task.train_size=200", "rl.grpo.group_size=4", "common.eval.max_new_tokens=8",
            "common.grpo.max_new_tokens=8"], log=lambda line: None)
    assert not (tmp_path / "z" / "02-rl").exists()


def test_pipeline_r1_runs_end_to_end_and_reports_every_stage(tmp_path):
    """Tiny budgets and one-digit sums keep it a smoke test; `make test-slow` runs the real one."""
    from nanoseek.recipes.r1 import run_pipeline

    sets = ["common.task.options.digits=1", "common.train.threads=1", "pipeline.progress=false",
            "pipeline.eval_examples=20", "common.eval.max_new_tokens=40",
            "base.train.steps=250", "base.train.batch_size=32", "base.task.train_size=600",
            "cold_start.train.steps=10", "reasoning_rl.train.steps=2", "rl.train.steps=2",
            "reasoning_rl.grpo.prompts_per_step=4", "rl.grpo.prompts_per_step=4",
            "common.grpo.max_new_tokens=40", "common.rejection.max_new_tokens=40",
            "rejection.rejection.prompts=32", "sft.train.steps=10", "sft.train.batch_size=16"]
    lines = []
    report = run_pipeline("r1", tmp_path / "r1", overrides=sets, log=lines.append)
    rows = report["stages"]
    assert [r["stage"] for r in rows] == ["base", "cold_start", "reasoning_rl", "rejection", "sft", "rl"]
    for r in rows:
        if r["stage"] != "rejection":
            assert 0 <= r["greedy_accuracy"] <= 1 and 0 <= r["language_consistency"] <= 1, r
    assert rows[3]["kept"] > 0
    assert any("accuracy" in line and "language consistency" in line for line in lines)
    assert "| cold_start |" in (tmp_path / "r1" / "report.md").read_text()
    # a second call reuses every finished stage
    lines.clear()
    again = run_pipeline("r1", tmp_path / "r1", overrides=sets, log=lines.append)
    assert sum("reused" in line for line in lines) == 6 and again["stages"] == rows
