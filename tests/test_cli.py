"""The command line: convert, and one-line errors with exit status 2 (the demo's own run: tests/test_demo.py)."""
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from data_fixtures import stdlib_dataset

import nanoseek
from nanoseek.cli import main
from nanoseek.config import ModelConfig
from nanoseek.infer.cli import use_color
from nanoseek.interop.hf import load_pretrained, save_pretrained
from nanoseek.train.checkpoint import list_checkpoints


def test_convert_fp8_and_back(tmp_path, seed):
    model = nanoseek.DeepSeekForCausalLM(nanoseek.ModelConfig.preset("tiny-v3")).eval()
    save_pretrained(model, tmp_path / "src")
    main(["convert", str(tmp_path / "src"), "--out", str(tmp_path / "fp8"), "--dtype", "fp8"])
    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]["fmt"] == "e4m3"
    main(["convert", str(tmp_path / "fp8"), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    bf16 = load_pretrained(tmp_path / "bf16", dtype=None)
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())


@pytest.fixture
def quick_demo_dir(tmp_path):
    from nanoseek.recipes.demo import Demo

    Demo(tmp_path / "demo", quick=True)._save_state()
    return tmp_path / "demo"


@pytest.mark.parametrize("argv,needle", [
    (["convert", "/no/such/dir", "--out", "/tmp/x"], "not found"),
    (["demo", "--out", "{quick_demo_dir}"], "holds a demo run with mode='quick'"),
    (["generate", "--model", "/no/such/dir", "--prompt", "hi"], "model directory not found: /no/such/dir"),
    (["serve", "--model", "/no/such/dir", "--port", "99999"], "--port 99999 is not a TCP port"),
    (["generate", "--model", "{garbage_tokenizer_dir}", "--prompt", "hi"], "tokenizer.json is not a valid tokenizer"),
])
def test_errors_are_one_line_exit_2(argv, needle, quick_demo_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text("garbage{")
    argv = [a.format(quick_demo_dir=quick_demo_dir, garbage_tokenizer_dir=tmp_path) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "nanoseek.cli", *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_version_license_and_no_color(monkeypatch, capsys):
    """`nanoseek --version` prints the installed version; LICENSE is the license pyproject declares; NO_COLOR
    (no-color.org) turns off --color auto even on a terminal."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"nanoseek {version('nanoseek')}"
    root = Path(__file__).resolve().parents[1]
    declared = tomllib.loads((root / "pyproject.toml").read_text())["project"]["license"]
    assert (root / "LICENSE").read_text().splitlines()[0] == f"{declared} License"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_color("auto")
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_color("auto") and use_color("always")


def test_config_json_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object, not list"):
        ModelConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("command", ["pretrain", "sft"])
def test_ctrl_c_prints_the_resume_command_and_exits_130(tmp_path, command):
    """Ctrl-C in a training run: no traceback, one line naming the last checkpoint and the exact command that
    continues the run, exit status 130."""
    out = tmp_path / "run"
    sets = ["train.steps=100000", "checkpoint.every=2", "train.threads=1", "log.tensorboard=false"]
    if command == "pretrain":
        data = stdlib_dataset(tmp_path, max_bytes=100_000, val_fraction=0.05)
        argv = ["pretrain", "--config", str(Path(__file__).parents[1] / "configs" / "tiny.toml"),
                "--set", f"data.dataset={json.dumps(str(data))}"]
    else:
        argv = ["sft", "--task", "arithmetic"]
    for s in sets:
        argv += ["--set", s]
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", *argv, "--out", str(out)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(list_checkpoints(out)) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err, err[-2000:]
    assert last.startswith(f"nanoseek {command}: interrupted (last checkpoint: step ")
    assert last.endswith(f"resume with: nanoseek {command} --out {out} --resume"), last
