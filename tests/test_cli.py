"""The command line: demo end to end, convert, and one-line errors with exit status 2."""
import json
import subprocess
import sys

import pytest
import torch

import nanoseek
from nanoseek.cli import main


def test_demo_runs_end_to_end(tmp_path, capsys):
    main(["demo", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "logits identical" in out and "5/5" in out
    model = nanoseek.DeepSeekForCausalLM.from_pretrained(tmp_path / "model")
    tok = nanoseek.load_tokenizer(tmp_path / "model")
    assert model.config.vocab_size == tok.vocab_size == 1024


def test_convert_fp8_and_back(tmp_path, seed):
    model = nanoseek.DeepSeekForCausalLM(nanoseek.ModelConfig.preset("tiny-v3")).eval()
    model.save_pretrained(tmp_path / "src")
    main(["convert", str(tmp_path / "src"), "--out", str(tmp_path / "fp8"), "--dtype", "fp8"])
    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]["fmt"] == "e4m3"
    main(["convert", str(tmp_path / "fp8"), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    bf16 = nanoseek.DeepSeekForCausalLM.from_pretrained(tmp_path / "bf16", dtype=None)
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())


@pytest.mark.parametrize("argv,needle", [
    (["convert", "/no/such/dir", "--out", "/tmp/x"], "not found"),
    (["generate", "--model", "/no/such/dir", "--prompt", "hi"], "tokenizer.json"),
])
def test_errors_are_one_line_exit_2(argv, needle):
    proc = subprocess.run([sys.executable, "-m", "nanoseek.cli", *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
