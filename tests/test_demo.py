"""`nanoseek demo` (issue 6): the chat-format corpus tokenizes like the prompts post-training sees, stages
run once and resume, the report states its findings from the numbers, and (slow) the quick demo runs
end to end and writes a report the CI check accepts."""
import json

import pytest

from nanoseek.data.chat import render_chat
from nanoseek.posttrain.sft import task_sft_rows
from nanoseek.recipes.demo import STYLES, Demo
from nanoseek.recipes.report import (
    THRESHOLDS,
    check_report,
    findings,
    results_table,
    threshold_failures,
)
from nanoseek.tasks import make_task


def test_chat_corpus_tokens_match_post_training_prompts(tmp_path):
    """A pretraining document (a rendered chat) encodes to exactly BOS + prompt + completion + EOS as
    post-training encodes them apart: the base sees at RL time the token boundaries it was trained on."""
    from nanoseek.data.tokenizer import train_tokenizer_from_texts
    from nanoseek.posttrain.trainer import encode_pair

    rows = task_sft_rows(make_task("bilingual"), 400, seed=0, styles=STYLES, tag_bare=True)
    docs = [render_chat([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}],
                        add_generation_prompt=False)
            for r in rows]
    tok = train_tokenizer_from_texts(docs, 300, None, progress=False)
    chat_task = make_task("bilingual", template="chat")
    for row, doc, example in zip(rows, docs, chat_task.examples(len(rows), seed=0, split="train")):
        assert example.question == row["prompt"]
        ids, mask = encode_pair(tok, example.prompt, row["completion"])
        assert tok.encode(doc) == ids
        assert tok.decode(ids[:len(ids) - sum(mask)]) == doc[:doc.index(row["completion"])]


def test_stages_run_once_resume_and_refuse_another_mode(tmp_path):
    calls = []

    def stage(value):
        def fn():
            calls.append(value)
            return {"value": value}
        return fn

    def broken():
        raise ValueError("no data")

    lines = []
    demo = Demo(tmp_path, quick=True, log=lines.append)
    assert demo._stage(1, "data", stage(1)) == {"value": 1}
    with pytest.raises(ValueError, match="no data"):
        demo._stage(2, "pretrain", broken)
    assert "demo stage 'pretrain' failed after 0 s: no data\n(fix the cause and run the same command again" in lines[-1]
    again = Demo(tmp_path, quick=True, log=lambda s: None)  # a new process: state from OUT/demo.json
    assert again._stage(1, "data", stage(2)) == {"value": 1}
    assert again._stage(2, "pretrain", stage(3)) == {"value": 3}
    assert calls == [1, 3]
    assert json.loads((tmp_path / "demo.json").read_text())["stages"]["pretrain"]["result"] == {"value": 3}
    with pytest.raises(ValueError, match="mode='quick'.*use another --out"):
        Demo(tmp_path, quick=False)
    with pytest.raises(ValueError, match="seed=0"):
        Demo(tmp_path, quick=True, seed=1)


def _row(stage, group, acc, **kw):
    return {"stage": stage, "group": group, "greedy_accuracy": acc, **kw}


def test_findings_follow_the_numbers():
    rows = [_row("base (pretrained)", "pretrain", 0.1, params=236_000, active_params=163_000),
            _row("R1-Zero: GRPO", "r1-zero", 0.9, language_consistency=0.6),
            _row("R1: rejection sampling", "r1", None, kept=10, samples=40),
            _row("R1: GRPO", "r1", 0.95, language_consistency=1.0, params=236_000, active_params=163_000),
            _row("student (distilled from R1)", "distill", 0.7, params=177_000, train_time=12.0)]
    rows[2].pop("greedy_accuracy")
    results = {"distill": {"traces": {"kept": 1234}}}
    text = findings(rows, results)
    assert "from 10.0% to 90.0% (improved)" in text[0]
    assert "95.0%: at least as accurate as R1-Zero (90.0%)" in text[1]
    assert "R1-Zero 60.0%, R1 100.0%" in text[2]
    assert "177K parameters" in text[3] and "70.0%" in text[3] and "1,234 teacher traces" in text[3]
    rows[3]["greedy_accuracy"] = 0.01
    rows[1]["greedy_accuracy"] = 0.05
    text = findings(rows, results)
    assert "(NOT improved)" in text[0] and "LESS accurate than" in text[1]
    table = results_table(rows)
    assert "| R1: rejection sampling |  | kept 10 of 40 samples |" in table
    assert "| base (pretrained) | 236K (163K) | 10.0% |" in table


def test_check_report_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="report.md"):
        check_report(tmp_path)
    (tmp_path / "report.md").write_text("| base (pretrained) |\n## Findings\n")
    (tmp_path / "report.json").write_text(json.dumps({"rows": [_row("base (pretrained)", "pretrain", 0.5)]}))
    with pytest.raises(ValueError, match=r"\['distill', 'r1', 'r1-zero'\]"):
        check_report(tmp_path)


def _report(base=0.0, zero=0.6, r1=0.62, zero_lang=0.5, r1_lang=1.0, student=0.3, accept=(0.9, 0.8)):
    rows = [_row("base (pretrained)", "pretrain", base),
            _row("R1-Zero: GRPO", "r1-zero", zero, language_consistency=zero_lang),
            _row("R1: cold-start SFT", "r1", 0.99, language_consistency=1.0),
            _row("R1: rejection sampling", "r1", None, kept=10, samples=40),
            _row("R1: GRPO", "r1", r1, language_consistency=r1_lang),
            _row("student (distilled from R1)", "distill", student)]
    rows[3].pop("greedy_accuracy")
    spec = {name: {"acceptance_rate": a} for name, a in zip(("base", "r1"), accept)}
    return {"mode": "quick", "seed": 0, "rows": rows, "speculative": spec}


@pytest.mark.parametrize("change, needle", [
    ({"zero": 0.15}, "R1-Zero raises held-out accuracy: base 0.0% -> R1-Zero 15.0% is +15.0 points, needs >= +20"),
    ({"r1": 0.57}, "R1 keeps R1-Zero's accuracy: R1 57.0% vs R1-Zero 60.0%, needs >= R1-Zero - 2 points"),
    ({"r1_lang": 0.5}, "R1 raises language consistency over R1-Zero: R1 50.0% vs R1-Zero 50.0%, needs R1 > R1-Zero"),
    ({"student": 0.0}, "the student learns from the teacher's traces: student 0.0% vs base 0.0%, needs student > base"),
    ({"accept": (0.9, 0.4)}, "MTP drafts are accepted: r1 acceptance 40.0%, needs >= 50%"),
])
def test_check_report_fails_on_each_missed_threshold(tmp_path, change, needle):
    """The CI check fails when the recipe stops working, naming the finding and its numbers."""
    assert threshold_failures(_report()) == []
    assert threshold_failures(_report(r1=0.58)) == []  # 2 points below R1-Zero is still within
    assert threshold_failures(_report(**change)) == [needle]
    (tmp_path / "report.md").write_text("| base (pretrained) |\n## Findings\n")
    (tmp_path / "report.json").write_text(json.dumps(_report()))
    assert check_report(tmp_path)["seed"] == 0
    (tmp_path / "report.json").write_text(json.dumps(_report(**change)))
    with pytest.raises(ValueError, match="quick plan, seed 0\\): 1 finding\\(s\\) miss their threshold") as e:
        check_report(tmp_path)
    assert needle in str(e.value)
    assert check_report(tmp_path, thresholds=None)["seed"] == 0
    assert set(THRESHOLDS) == {"r1_zero_gain", "r1_below_r1_zero", "mtp_acceptance"}


def test_quick_plan_is_smaller_and_says_so(tmp_path):
    """The report says which plan ran, and that quick's numbers come from a smaller budget."""
    quick, full = Demo(tmp_path / "q", quick=True), Demo(tmp_path / "f")
    assert quick.plan.pretrain_steps * quick.plan.pretrain_batch < full.plan.pretrain_steps * full.plan.pretrain_batch
    assert "**Plan: quick**" in quick.plan_text() and "smaller budget than the full demo's" in quick.plan_text()
    assert full.plan_text().startswith("**Plan: full**")
    # The base must answer greedily without reasoning: the bare answers stay the majority.
    assert quick.plan.styles["buggy"] > 0.5 and full.plan.styles == STYLES


@pytest.mark.slow
def test_quick_demo_end_to_end_and_rerun_reuses(tmp_path):
    from nanoseek.recipes.demo import run

    report = run(tmp_path, quick=True, threads=1, progress=False)
    assert check_report(tmp_path)["rows"] == json.loads(json.dumps(report["rows"]))
    assert all(s["identical"] for s in report["speculative"].values())
    assert "**Plan: quick**" in (tmp_path / "report.md").read_text() and report["plan"]["pretrain_steps"] == 1000
    for name in ("pretraining", "experts", "grpo", "accuracy"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 10_000
    lines = []
    Demo(tmp_path, quick=True, threads=1, progress=False, log=lines.append).run()
    assert sum("reused" in line for line in lines) == 6
