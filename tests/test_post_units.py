"""Post-training building blocks (issue 5), fast and model-free where possible: the config, SFT data
encoding and packing, rollout batches, rejection-sampling filters, the pipeline plan, the CLI."""
import pytest

from nanoseek.data.tokenizer import train_tokenizer_from_texts
from nanoseek.posttrain.config import PostConfig
from nanoseek.tasks import make_task


@pytest.fixture(scope="module")
def tok():
    task = make_task("arithmetic")
    texts = [e.prompt + task.sft_example(e, s) for e in task.examples(300, seed=0) for s in ("think", "buggy")]
    return train_tokenizer_from_texts(texts, 300, None, progress=False)


# ---------------------------------------------------------------- config
def test_config_round_trips_and_fails_clearly(tmp_path):
    cfg = PostConfig.load(None, ["grpo.beta=0.04", "task.options.digits=3", "model.overrides.hidden_size=32",
                                  "data.styles={think=0.3, buggy=0.7}"])
    assert cfg.grpo.beta == 0.04 and cfg.task.options == {"digits": 3}
    assert cfg.data.styles == {"think": 0.3, "buggy": 0.7}
    again = PostConfig.from_toml_text(cfg.to_toml())
    assert again.to_dict() == cfg.to_dict()
    with pytest.raises(ValueError, match="grpo.aggregation = 'mean' is invalid: allowed: token, sequence, dr_grpo"):
        PostConfig.load(None, ["grpo.aggregation=mean"])
    with pytest.raises(ValueError, match="unknown config key 'grpo.epsilom'"):
        PostConfig.load(None, ["grpo.epsilom=0.2"])
    with pytest.raises(ValueError, match="grpo.group_size = 1 is invalid"):
        PostConfig.load(None, ["grpo.group_size=1"])
    with pytest.raises(ValueError, match="task.name = 'algebra' is invalid"):
        PostConfig.load(None, ["task.name=algebra"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[grpo]\nbeta = 'x'\n")
    with pytest.raises(ValueError, match=r"bad.toml: grpo.beta = 'x' is invalid: expected float"):
        PostConfig.load(bad)


# ---------------------------------------------------------------- SFT data
def test_sft_rows_encode_completion_only_masks_and_pack(tok, tmp_path):
    from nanoseek.posttrain.sft import (
        encode_rows,
        pack,
        read_rows,
        style_plan,
        task_sft_rows,
    )
    from nanoseek.posttrain.trainer import collate

    rows = [{"prompt": "12+79=", "completion": "<think>2+9+0=11 1+7+1=9</think><answer>91</answer>"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    (ids0, m0), (ids1, m1) = encode_rows(rows, tok, seq_len=128)
    p = tok.encode("12+79=", add_bos=True)
    assert ids0[:len(p)] == p and ids0[-1] == tok.eos_id
    assert m0 == [0] * len(p) + [1] * (len(ids0) - len(p))
    assert tok.decode([t for t, m in zip(ids0, m0) if m][:-1]) == rows[0]["completion"]
    assert tok.decode([t for t, m in zip(ids1, m1) if m]) == "hello<｜end▁of▁sentence｜>"
    assert encode_rows(rows[:1], tok, 128, completion_only=False)[0][1] == [1] * len(ids0)
    assert len(encode_rows(rows[:1], tok, seq_len=5)[0][0]) == 5

    packed = pack([(ids0, m0), (ids0, m0), (ids1, m1)], seq_len=2 * len(ids0))
    assert len(packed) == 2 and packed[0][0] == ids0 + ids0
    assert packed[0][2] == list(range(len(ids0))) * 2  # positions restart with every example
    batch = collate(packed, tok.pad_id)
    assert batch.ids.shape == (2, 2 * len(ids0)) and batch.loss_mask.shape == (2, 2 * len(ids0) - 1)
    assert batch.positions[1, :len(ids1)].tolist() == list(range(len(ids1)))
    assert batch.loss_mask[1, len(ids1) - 1:].sum() == 0  # padding is never a target

    plan = style_plan(10, {"think": 0.3, "buggy": 0.7}, seed=0)
    assert sorted(plan) == ["buggy"] * 7 + ["think"] * 3
    gen = task_sft_rows(make_task("arithmetic"), 20, 0, {"think": 0.5, "buggy": 0.5}, tag_bare=True)
    assert all(r["completion"].startswith("<think>" if r["style"] == "think" else "<answer>") for r in gen)
    with pytest.raises(ValueError, match=r"data.styles \['switched'\] are not styles of task 'arithmetic'"):
        task_sft_rows(make_task("arithmetic"), 4, 0, {"switched": 1.0})

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        read_rows(bad)
    with pytest.raises(ValueError, match="row 0: expected"):
        encode_rows([{"text": "x"}], tok, 16)


def test_rollout_batch_masks_sampled_tokens_and_truncation(tok):
    from nanoseek.infer.generate import Sample
    from nanoseek.posttrain.grpo import rollout_batch

    prompts = [tok.encode("1+2=", add_bos=True), tok.encode("12+34=", add_bos=True)]
    samples = [Sample([40, 41, tok.eos_id], "x", True), Sample([40, 41, 42, 43], "y", False)]
    b = rollout_batch(prompts, samples, tok.pad_id)
    assert b.loss_mask.sum(1).tolist() == [3, 4]  # EOS is an action; a truncated row counts all it sampled
    assert b.ids[0, len(prompts[0]):len(prompts[0]) + 3].tolist() == [40, 41, tok.eos_id]
    assert rollout_batch(prompts, samples, tok.pad_id, mask_truncated=True).loss_mask.sum(1).tolist() == [3, 0]


# ---------------------------------------------------------------- rejection sampling
def test_rejection_sampling_keeps_verified_wellformed_single_language(monkeypatch):
    import nanoseek.posttrain.rejection as rej
    from nanoseek.infer.generate import Sample

    task = make_task("bilingual", languages=["en"])
    ex = task.examples(2, seed=0)
    good = task.sft_example(ex[0], "think")
    canned = [
        Sample([1], good, True),                                      # kept
        Sample([1], good, True),                                      # duplicate
        Sample([1], good.replace(ex[0].answer, "0" + ex[0].answer), True),   # incorrect
        Sample([1], task.sft_example(ex[0], "switched"), True),       # other language
        Sample([1], ex[1].answer, True),                              # bare: not well formed
        Sample([1], task.sft_example(ex[1], "think"), False),         # truncated
        Sample([1], task.sft_example(ex[1], "think"), True),          # kept
        Sample([1], task.sft_example(ex[1], "think") + " ", True),    # over the per-prompt limit
    ]
    monkeypatch.setattr(rej, "sample_completions", lambda *a, **k: canned)
    rows, stats = rej.rejection_sample(None, None, task, ex, samples=4)
    assert [r["completion"] for r in rows] == [good, task.sft_example(ex[1], "think")]
    assert stats["rejected"] == {"incorrect": 1, "truncated": 1, "format": 1, "language": 1, "duplicate": 1,
                                 "over_limit": 1}
    assert stats["kept"] == 2 and stats["prompts_solved"] == 1.0
    assert stats["generated_tokens"] == 8 and stats["tokens_per_s"] > 0
    rows, stats = rej.rejection_sample(None, None, task, ex, samples=4, require_format=False,
                                       require_language=False, max_per_prompt=4)
    assert len(rows) == 5 and stats["rejected"] == {**dict.fromkeys(rej.REASONS, 0), "incorrect": 1, "truncated": 1,
                                                    "duplicate": 1}


# ---------------------------------------------------------------- pipeline plan
def test_the_shortcut_style_is_each_tasks_answer_without_reasoning():
    """The bimodal base's second mode: arithmetic's dropped carries; countdown has no such answer, so a bare
    expression (which a model cannot find without search) stands in."""
    from nanoseek.posttrain.sft import task_sft_rows

    rows = task_sft_rows(make_task("arithmetic"), 20, seed=0, styles={"think": 0.5, "shortcut": 0.5})
    assert {r["style"] for r in rows} == {"think", "buggy"}
    rows = task_sft_rows(make_task("countdown"), 20, seed=0, styles={"think": 0.5, "shortcut": 0.5})
    assert {r["style"] for r in rows} == {"think", "bare"}
    with pytest.raises(ValueError, match="'shortcut'"):
        task_sft_rows(make_task("countdown"), 4, seed=0, styles={"buggy": 1.0})


def test_pipeline_plan_chains_stages_and_applies_overrides(tmp_path):
    from nanoseek.recipes.r1 import load_pipeline_config, plan

    cfg = load_pipeline_config("r1", None, ["common.train.threads=1", "rl.grpo.beta=0.04", "pipeline.eval_k=4",
                                            "rl.task.weights.format=0.5"])
    stages = {s.name: s for s in plan("r1", tmp_path, cfg)}
    assert list(stages) == ["base", "cold_start", "reasoning_rl", "rejection", "sft", "rl"]
    assert stages["base"].config.model.init_from == ""
    assert stages["cold_start"].config.model.init_from == str(tmp_path / "01-base" / "model")
    assert stages["sft"].config.model.init_from == str(tmp_path / "01-base" / "model")  # R1 retrains the base
    assert stages["sft"].config.data.train == str(tmp_path / "04-rejection" / "data.jsonl")
    assert stages["rl"].config.grpo.beta == 0.04 and stages["reasoning_rl"].config.grpo.beta == 0.0
    assert stages["rl"].config.task.weights == {"accuracy": 1.0, "language": 1.0, "format": 0.5}
    assert stages["reasoning_rl"].config.task.weights == {"accuracy": 1.0, "language": 1.0}
    assert all(s.config.train.threads == 1 and s.config.eval.k == 4 for s in stages.values())
    zero = plan("r1-zero", tmp_path, load_pipeline_config("r1-zero", None, ["pipeline.base=/some/base"]))
    assert [s.name for s in zero] == ["rl"] and zero[0].config.model.init_from == "/some/base"
    with pytest.raises(ValueError, match="unknown table 'rlhf'"):
        load_pipeline_config("r1", None, ["rlhf.train.steps=3"])
    with pytest.raises(ValueError, match="stage 'rl': grpo.mu = 0 is invalid"):
        plan("r1-zero", tmp_path, load_pipeline_config("r1-zero", None, ["rl.grpo.mu=0"]))


# ---------------------------------------------------------------- CLI
def _cli(capsys, *args):
    """(exit code, stdout, stderr) of `nanoseek ARGS`, run in this process (a subprocess costs seconds)."""
    from nanoseek.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_commands_have_help_show_config_and_fail_in_one_line(tmp_path, capsys):
    for command in ("sft", "dpo", "grpo", "distill", "rejection-sample", "pipeline", "eval"):
        code, out, _ = _cli(capsys, command, "--help")
        assert code == 0 and "--config" in out and "--set" in out, command
    code, out, _ = _cli(capsys, "grpo", "--set", "grpo.beta=0.04", "--seed", "3", "--task", "bilingual",
                        "--show-config")
    assert code == 0
    shown = PostConfig.from_toml_text(out)
    assert shown.grpo.beta == 0.04 and shown.train.seed == 3 and shown.task.name == "bilingual"
    # issue 18.11: GRPO starts from RL's learning rate, not SFT's (1e-3 took a solved task from 100% to 35%)
    assert shown.optim.lr == 1e-4 and PostConfig.from_toml_text(_cli(capsys, "sft", "--show-config")[1]).optim.lr == 1e-3
    code, out, _ = _cli(capsys, "grpo", "--keys")
    assert code == 0 and "grpo.epsilon_high" in out and "[sft]" not in out and "optim.lr (float, default 0.0001)" in out
    code, _, err = _cli(capsys, "grpo", "--set", "grpo.aggregation=mean", "--out", str(tmp_path / "x"))
    assert code == 2 and err.count("\n") == 1 and "grpo.aggregation" in err
    code, _, err = _cli(capsys, "grpo", "--task", "arithmetic", "--out", str(tmp_path / "y"))
    assert code == 2 and "model.init_from" in err
    code, _, err = _cli(capsys, "eval", "--model", str(tmp_path / "missing"), "--task", "arithmetic")
    assert code == 2 and "missing" in err
    code, _, err = _cli(capsys, "pipeline", "r1", "--set", "nope.train.steps=1", "--out", str(tmp_path / "p"))
    assert code == 2 and "unknown table 'nope'" in err
