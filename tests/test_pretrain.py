"""Pretraining (issue 3): the loop lowers held-out loss, exports an HF model, resumes bit-identically after
SIGKILL, balances experts with the aux-loss-free bias, skips bad steps and rolls back, fails early on bad input."""
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from data_fixtures import stdlib_dataset

from nanoseek.config import ModelConfig
from nanoseek.interop.hf import load_pretrained
from nanoseek.model.transformer import DeepSeekForCausalLM
from nanoseek.pretrain.config import PretrainConfig
from nanoseek.pretrain.losses import document_mask
from nanoseek.pretrain.trainer import Pretrainer, TrainingError, pretrain
from nanoseek.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """300 KB of the standard library, a 512-token BPE, 2% of documents held out (built once per worker)."""
    return stdlib_dataset(tmp_path_factory.mktemp("pretrain-data"), max_bytes=300_000, val_fraction=0.02)


def tiny(dataset, *sets):
    return PretrainConfig.load(TINY, [f"data.dataset={json.dumps(str(dataset))}", "train.threads=1",
                                  "log.progress=false", "log.tensorboard=false", *sets])


def steps(run_dir):
    return [r for r in read_metrics(run_dir) if "loss" in r]


# ---------------------------------------------------------------- a run
def test_tiny_run_lowers_heldout_loss_and_exports_hf_model(dataset, tmp_path):
    import transformers

    out = tmp_path / "run"
    summary = pretrain(tiny(dataset, "train.steps=40", "eval.every=10"), out)
    records = steps(out)
    assert [r["step"] for r in records] == list(range(1, 41))
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(evals) == 4
    assert evals[-1] < evals[0] < math.log(512)  # below a uniform guess, and falling
    assert evals[-1] < math.log(512) - 1.0
    last = records[-1]
    assert last["val_bpb"] == pytest.approx(summary["val_bpb"])
    for key in ("mtp_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "max_vio_batch", "max_vio_global"):
        assert key in last, key
    assert len(last["max_vio_batch"]) == 3  # MoE layers 1, 2 and the MTP layer
    assert 0 < last["mfu"] < 1 and last["tokens_per_s"] > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000020", "step-00000040"]
    assert (out / "config.toml").is_file()
    assert summary["optim_bytes_per_param"] == 8.0  # fp32 AdamW moments (optim.moments_dtype = auto, no FP8)

    # DIR/model: nanoseek and transformers load it and agree; its tokenizer loads in AutoTokenizer.
    ns = load_pretrained(out / "model")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "model", attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(out / "model")
    ids = torch.tensor([tok.encode("import os\n\ndef main(argv=None):\n    return 0\n")])
    with torch.no_grad():
        torch.testing.assert_close(ns(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)
    biases = [m.gate.e_score_correction_bias for m in ns.moe_layers()]
    assert all(b.abs().sum() > 0 for b in biases)  # the aux-loss-free biases were trained and saved


# ---------------------------------------------------------------- resume after SIGKILL
_CHILD = textwrap.dedent("""
    import sys, time
    from nanoseek.pretrain.config import PretrainConfig
    from nanoseek.pretrain.trainer import pretrain
    config, out, *sets = sys.argv[1:]
    slow = lambda step, micro, loss: (time.sleep(0.15), loss)[1]  # room to kill it mid-run
    pretrain(PretrainConfig.load(config, sets), out, loss_hook=slow, progress=False)
""")


@pytest.mark.parametrize("moments", ["fp32", "bf16"])
def test_resume_after_sigkill_gives_bit_identical_losses(dataset, tmp_path, moments):
    sets = ["train.steps=14", "checkpoint.every=4", "eval.every=7", "train.dtype=fp32", f"optim.moments_dtype={moments}"]
    reference = tmp_path / "reference"
    pretrain(tiny(dataset, *sets), reference)

    killed = tmp_path / "killed"
    child_sets = [f"data.dataset={json.dumps(str(dataset))}", "train.threads=1", "log.progress=false",
                  "log.tensorboard=false", *sets]
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(TINY), str(killed), *child_sets],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        done = steps(killed)
        if done and done[-1]["step"] >= 6:  # past the step-4 checkpoint, before the step-8 one
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    from nanoseek.train.checkpoint import latest_checkpoint
    assert latest_checkpoint(killed).name in ("step-00000004", "step-00000008")  # killed mid-run
    assert steps(killed)[-1]["step"] < 14

    pretrain(tiny(dataset, *sets), killed, resume=True)
    a, b = steps(reference), steps(killed)
    assert [r["step"] for r in b] == list(range(1, 15))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit-identical floats
    assert [r["mtp_loss"] for r in a] == [r["mtp_loss"] for r in b]
    assert [r["val_loss"] for r in a if "val_loss" in r] == [r["val_loss"] for r in b if "val_loss" in r]
    from safetensors.torch import load_file
    wa, wb = load_file(reference / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_damaged_checkpoints_are_skipped_for_the_newest_intact_one(dataset, tmp_path):
    """Each checkpoint records the SHA-256 of its files and of its trainer state; resuming verifies them and
    skips damaged checkpoints (a changed byte in the weights, an edited step, a truncated RNG file) with a
    warning naming each, resumes from the newest intact one and trains to the same losses. Temporary
    directories a kill left behind are removed; a damaged trainer state is a one-line error naming the file."""
    from nanoseek.interop.hf import CheckpointError
    from nanoseek.train.checkpoint import verify_checkpoint

    sets = ["train.steps=10", "checkpoint.every=2", "checkpoint.keep=5", "eval.every=0", "train.dtype=fp32",
            "schedule.warmup_steps=1"]
    run = tmp_path / "run"
    pretrain(tiny(dataset, *sets), run)
    losses = [r["loss"] for r in steps(run)]
    ckpts = run / "checkpoints"
    shutil.copytree(ckpts / "step-00000004", tmp_path / "spare")
    weights = max((ckpts / "step-00000010" / "state").iterdir(), key=lambda f: f.stat().st_size)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    state_file = ckpts / "step-00000008" / "trainer_state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "step": 9}))
    rng = ckpts / "step-00000006" / "rng-00000.safetensors"
    rng.write_bytes(rng.read_bytes()[:100])
    leftovers = [ckpts / ".tmp-step-00000012", run / ".model.tmp-999", run / ".model.old-999"]
    for d in leftovers:
        (d / "part").mkdir(parents=True)

    with pytest.warns(UserWarning) as caught:
        pretrain(tiny(dataset, *sets), run, resume=True)
    said = "\n".join(str(w.message) for w in caught)
    assert f"step-00000010: {weights}: checksum mismatch" in said
    assert "step-00000008" in said and "content does not match its checksum" in said
    assert f"step-00000006: {rng}: checksum mismatch" in said and "resumed from step-00000004" in said
    assert [r["loss"] for r in steps(run)] == losses  # bit-identical from step 5 on
    assert not any(d.exists() for d in leftovers)

    spare = tmp_path / "spare" / "trainer_state.json"
    good = json.loads(spare.read_text())
    spare.write_text(json.dumps({k: v for k, v in good.items() if k != "step"}))
    with pytest.raises(CheckpointError, match=r"trainer_state.json: missing step"):
        verify_checkpoint(spare.parent)
    spare.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"trainer_state.json: not valid JSON"):
        verify_checkpoint(spare.parent)
    for ckpt in ckpts.iterdir():
        (ckpt / "trainer_state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no intact checkpoint"), pytest.warns(UserWarning, match="missing format"):
        pretrain(tiny(dataset, *sets), run, resume=True)


def test_resume_refuses_a_changed_config_and_fresh_runs_refuse_old_checkpoints(dataset, tmp_path):
    out, short = tmp_path / "run", ("schedule.warmup_steps=1", "checkpoint.every=2")
    pretrain(tiny(dataset, "train.steps=4", *short), out)
    with pytest.raises(ValueError, match="--resume"):
        Pretrainer(tiny(dataset, "train.steps=4", *short), out)
    with pytest.raises(ValueError, match="optim.lr"):
        Pretrainer(tiny(dataset, "train.steps=8", "optim.lr=1e-4", *short), out, resume=True)
    summary = pretrain(tiny(dataset, "train.steps=6", *short), out, resume=True)  # more steps: allowed
    assert summary["steps"] == 6 and [r["step"] for r in steps(out)] == list(range(1, 7))


# ---------------------------------------------------------------- balance
def _mean_vio(run_dir, last=10):
    return sum(r["max_vio_batch_mean"] for r in steps(run_dir)[-last:]) / last


def test_aux_loss_free_balancing_lowers_max_vio(dataset, tmp_path):
    common = ["train.steps=40", "eval.every=0", "checkpoint.every=0", "balance.bias_update_speed=0.01"]
    pretrain(tiny(dataset, *common, "balance.bias_update_speed=0", "model.overrides.seq_aux_alpha=0"), tmp_path / "none")
    pretrain(tiny(dataset, *common, "model.overrides.seq_aux_alpha=0"), tmp_path / "free")
    none, free = _mean_vio(tmp_path / "none"), _mean_vio(tmp_path / "free")
    assert free < 0.6 * none, (free, none)
    assert steps(tmp_path / "none")[-1]["router_bias_absmax"] == 0.0
    assert steps(tmp_path / "free")[-1]["router_bias_absmax"] > 0
    assert steps(tmp_path / "none")[-1]["aux_loss"] == 0.0  # no balance loss either


V2_LOSSES = ("model.overrides.seq_aux_alpha=0", "model.overrides.expert_aux_alpha=0.003",
             "model.overrides.device_aux_alpha=0.05", "model.overrides.comm_aux_alpha=0.02")


def test_v2_losses_and_device_level_token_dropping_run(dataset, tmp_path):
    out = tmp_path / "v2"
    pretrain(tiny(dataset, "train.steps=4", "eval.every=0", "schedule.warmup_steps=1", "balance.bias_update_speed=0",
                  *V2_LOSSES, "balance.capacity_factor=1.0", "model.overrides.ep_size=4", "model.overrides.topk_devices=2"), out)
    r = steps(out)[-1]
    assert r["aux_loss"] > 0 and 0 < r["dropped_fraction"] < 0.5 and r["router_bias_absmax"] == 0.0
    assert math.isfinite(r["val_loss"])


# ---------------------------------------------------------------- guards
def test_nonfinite_and_spiking_losses_skip_and_repeated_failures_roll_back(dataset, tmp_path):
    poison = {3: math.nan, 6: math.inf, 7: math.nan, 8: math.nan, 13: 100.0}

    def hook(step, micro, loss):  # each injection fires once: after a rollback the steps run clean
        return loss * poison.pop(step) if step in poison else loss

    out = tmp_path / "run"
    summary = pretrain(tiny(dataset, "train.steps=16", "checkpoint.every=5", "eval.every=0",
                            "train.spike_warmup=5", "train.max_bad_steps=3"), out, loss_hook=hook)
    records = steps(out)
    skipped = {(r["step"], r["skipped"]) for r in records if "skipped" in r}
    assert skipped == {(4, "non-finite"), (7, "non-finite"), (8, "non-finite"), (9, "non-finite"), (14, "spike")}
    rollback = [r for r in records if "rollback_to" in r]
    assert [(r["step"], r["rollback_to"]) for r in rollback] == [(9, 5)]
    assert summary["rollbacks"] == 1 and summary["steps"] == 16 and math.isfinite(summary["val_loss"])
    assert records[-1]["step"] == 16
    from safetensors.torch import load_file
    assert all(torch.isfinite(t).all() for t in load_file(out / "model" / "model.safetensors").values())


def test_divergence_without_checkpoint_stops_with_a_clear_error(dataset, tmp_path):
    with pytest.raises(TrainingError, match="no checkpoint to roll back to"):
        pretrain(tiny(dataset, "train.steps=10", "checkpoint.every=0", "train.max_bad_steps=2"), tmp_path / "run",
                 loss_hook=lambda step, micro, loss: loss * math.nan)


# ---------------------------------------------------------------- batch composition
def test_grad_accumulation_matches_one_big_batch(dataset, tmp_path):
    def after_one_step(*sets):
        tr = Pretrainer(tiny(dataset, "train.steps=1", "eval.every=0", "schedule.lr_schedule=constant",
                          "balance.bias_update_speed=0", "model.overrides.seq_aux_alpha=0", *sets),
                     tmp_path / sets[-1].replace("=", "-"))
        record = tr.train_step()
        return record, torch.cat([p.detach().flatten() for p in tr.model.parameters()])

    r1, p1 = after_one_step("train.batch_size=8", "train.micro_batch_size=0")
    r2, p2 = after_one_step("train.batch_size=8", "train.micro_batch_size=4")
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-6) and r1["batch_size"] == r2["batch_size"] == 8
    torch.testing.assert_close(p1, p2, atol=1e-5, rtol=1e-4)  # Adam step 1 moves every weight by ~lr = 3e-3


def test_batch_ramp_lr_and_mtp_schedules_are_wired(dataset, tmp_path):
    cfg = tiny(dataset, "train.steps=12", "eval.every=0", "train.batch_size=8", "train.micro_batch_size=2",
               "schedule.batch_ramp_start=2", "schedule.batch_ramp_tokens=1280",
               "schedule.lr_schedule=deepseek-multistep", "schedule.warmup_steps=2", "mtp.switch_at=0.5",
               "mtp.weight=0.3", "mtp.weight_after=0.1")
    out = tmp_path / "run"
    pretrain(cfg, out)
    records = steps(out)
    sizes = [r["batch_size"] for r in records]
    assert sizes[0] == 2 and sizes[-1] == 8 and sizes == sorted(sizes)
    schedule = cfg.lr_schedule()
    assert [r["lr"] for r in records] == [schedule(i) for i in range(12)]
    lrs = [r["lr"] for r in records]
    assert lrs[1] == 3e-3 and lrs[10] == pytest.approx(3e-3 * 0.316) and lrs[11] == pytest.approx(3e-4)
    assert [r["mtp_weight"] for r in records] == [0.3] * 6 + [0.1] * 6
    assert [r["tokens"] for r in records] == list(itertools.accumulate(s * 64 for s in sizes))


# ---------------------------------------------------------------- bad input, before training
# ---------------------------------------------------------------- the document mask
def test_document_mask_is_causal_and_cut_at_each_bos_or_after_each_eos():
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [0, 1, 0, 0, 0, 0],
                             [0, 1, 1, 0, 0, 0],
                             [0, 1, 1, 1, 0, 0],
                             [0, 0, 0, 0, 1, 0],
                             [0, 0, 0, 0, 1, 1]], dtype=torch.bool)[None, None]
    # the tail of a document, then two that start with BOS (0); the EOS (1) inside the second ends a turn
    assert torch.equal(document_mask(torch.tensor([[7, 0, 5, 1, 0, 8]]), bos_id=0), expected)
    # documents without BOS: cut after each EOS
    assert torch.equal(document_mask(torch.tensor([[1, 4, 5, 1, 6, 8]]), eos_id=1), expected)


@pytest.mark.parametrize("preset", ["tiny-v3", "tiny-dense"])
def test_masked_packed_documents_give_the_logits_each_has_alone(preset):
    """RoPE attention is relative: a document masked off from what precedes it in the window scores exactly
    as it does alone at positions 0.. (YaRN included), main head and MTP alike; unmasked, it does not."""
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(ModelConfig.preset(preset, vocab_size=64)).eval()
    first, second = torch.randint(2, 64, (1, 13)), torch.randint(2, 64, (1, 17))
    second[0, 0] = 0  # its BOS
    ids = torch.cat([first, second], 1)
    with torch.no_grad():
        alone = model(second)
        packed = model(ids, attention_mask=document_mask(ids, bos_id=0))
        first[0, -1] = 1  # ended by EOS instead
        ids = torch.cat([first, second], 1)
        assert torch.equal(document_mask(ids, eos_id=1), document_mask(ids, bos_id=0))
        unmasked = model(ids)
    n = second.shape[1]
    torch.testing.assert_close(packed.logits[:, -n:], alone.logits, atol=2e-5, rtol=1e-4)
    for p, a in zip(packed.mtp_logits, alone.mtp_logits):
        torch.testing.assert_close(p[:, -(a.shape[1]):], a, atol=2e-5, rtol=1e-4)
    assert (unmasked.logits[:, -n:] - alone.logits).abs().max() > 1e-2


def test_training_with_the_document_mask(dataset, tmp_path):
    masked = pretrain(tiny(dataset, "train.steps=12", "eval.every=6", "data.document_mask=true"), tmp_path / "m")
    plain = pretrain(tiny(dataset, "train.steps=12", "eval.every=6"), tmp_path / "p")
    # same batches and initialization: the mask changes what attention sees, so the losses differ a little
    assert math.isfinite(masked["val_loss"]) and masked["val_loss"] != plain["val_loss"]
    assert abs(masked["val_loss"] - plain["val_loss"]) < 0.1 * plain["val_loss"]
    # plain-text documents carry no BOS: they are cut after each EOS
    trainer = Pretrainer(tiny(dataset, "data.document_mask=true"), tmp_path / "c")
    assert trainer.cuts == {"eos_id": trainer.tok.eos_id}


def test_bad_inputs_fail_before_training(dataset, tmp_path):
    with pytest.raises(FileNotFoundError, match="data.dataset"):
        Pretrainer(tiny(tmp_path / "nowhere"), tmp_path / "a")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        Pretrainer(PretrainConfig.load(TINY, [f"data.sources=[{json.dumps(str(empty))}]", "log.progress=false"]),
                tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="not found"):
        Pretrainer(PretrainConfig.load(TINY, [f"data.sources=[{json.dumps(str(tmp_path / 'missing.txt'))}]"]), tmp_path / "c")
    with pytest.raises(ValueError, match="vocab_size 512 is larger than the model's vocab_size 300"):
        Pretrainer(tiny(dataset, "model.overrides.vocab_size=300"), tmp_path / "d")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Pretrainer(tiny(dataset, "data.seq_len=200"), tmp_path / "e")
    with pytest.raises(ValueError, match=r"\[schedule\].*warmup_steps"):
        tiny(dataset, "train.steps=10", "schedule.warmup_steps=50")
    # a model far too big for this machine is refused before its tokenizer or weights are built
    with pytest.raises(ValueError, match=r"vocab_size 1,000,000,000.*more than the .* GiB available"):
        Pretrainer(PretrainConfig.load(TINY, ["model.overrides.vocab_size=1000000000", "log.progress=false"]),
                   tmp_path / "f")
    assert not (tmp_path / "d" / "metrics.jsonl").exists()


def test_cli_reports_errors_in_one_line_and_exits_2(tmp_path, capsys):
    from nanoseek.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlrr = 1e-3\n")
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--config", str(bad), "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "optim.lrr" in err and "valid keys: lr, beta1" in err
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--config", str(TINY), "--set", "train.dtype=fp16", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "train.dtype = 'fp16' is invalid: allowed: fp32, bf16" in capsys.readouterr().err


# ---------------------------------------------------------------- precision and compilation
def test_fp8_and_bf16_training_runs(dataset, tmp_path):
    out = tmp_path / "fp8"
    summary = pretrain(tiny(dataset, "train.steps=3", "schedule.warmup_steps=1", "train.fp8=true",
                            "train.dtype=bf16"), out)
    assert math.isfinite(summary["val_loss"]) and summary["val_loss"] < math.log(512) + 0.5
    assert summary["optim_bytes_per_param"] == 4.0  # FP8 runs keep AdamW's moments in BF16 (V3 §3.3.3)
    load_pretrained(out / "model")  # FP8Linear keeps nn.Linear's keys


@pytest.mark.slow
def test_compiled_training_matches_eager_closely(dataset, tmp_path):
    sets = ("train.steps=3", "schedule.warmup_steps=1", "eval.every=0", "balance.bias_update_speed=0", "train.dtype=bf16")
    eager = pretrain(tiny(dataset, *sets), tmp_path / "eager")
    compiled = pretrain(tiny(dataset, *sets, "train.compile=true"), tmp_path / "compiled")
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-2)


def test_cli_lists_keys_and_shows_the_resolved_config(capsys):
    from nanoseek.cli import main

    main(["pretrain", "--keys"])
    assert "balance.bias_update_speed (float, default 0.001)" in capsys.readouterr().out
    main(["pretrain", "--config", str(TINY), "--set", "optim.lr=1e-3", "--seed", "7", "--show-config"])
    shown = capsys.readouterr().out
    assert "lr = 0.001" in shown and "seed = 7" in shown and 'preset = "tiny-v3"' in shown


@pytest.mark.parametrize("preset", ["tiny-v2", "tiny-dense"])
def test_other_model_families_train(dataset, tmp_path, preset):
    """V2 (softmax router, no MTP) and the dense DeepSeek-LLM layout (GQA, no experts) go through the same loop."""
    out = tmp_path / preset
    summary = pretrain(tiny(dataset, f"model.preset={preset}", "train.steps=3", "schedule.warmup_steps=1",
                            "balance.bias_update_speed=0"), out)
    r = steps(out)[-1]
    assert math.isfinite(summary["val_loss"]) and r["mtp_loss"] == 0.0
    assert ("max_vio_batch" in r) == (preset == "tiny-v2")
