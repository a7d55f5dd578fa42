"""Progress: a bar on a terminal, plain periodic lines in a log (no carriage returns); shown by the long-running
commands (training, tokenizing, eval, convert, rejection-sample)."""
import pytest
import torch

import nanoseek
from nanoseek.cli import main
from nanoseek.data import load_tokenizer
from nanoseek.interop.hf import save_pretrained
from nanoseek.posttrain.config import PostConfig
from nanoseek.posttrain.sft import sft
from nanoseek.utils import LineProgress, progress_bar


def test_a_log_gets_plain_lines(capsys):
    with progress_bar(total=4, desc="work", unit="doc") as bar:  # (stderr is captured: not a terminal)
        assert isinstance(bar, LineProgress)
        bar.update(2)
        bar.set_postfix({"loss": "1.000"}, refresh=False)
        bar.update(2)
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("\n") == 1  # one line at the end (the next is due after 30 s)
    assert err.startswith("work: 4/4 doc (100%), 0s, ") and err.strip().endswith("doc/s, loss=1.000")
    with progress_bar(total=3, desc="often", every=0) as bar:
        for _ in range(3):
            bar.update()
    assert capsys.readouterr().err.count("\n") == 3
    with progress_bar(False, total=3) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""


def test_training_progress_in_a_log_is_plain_lines(tmp_path, capfd):
    sft(PostConfig.load(None, ["task.name=arithmetic", "train.steps=3", "train.threads=1", "log.progress=true",
                               "log.tensorboard=false", "eval.examples=2", "eval.at_start=false",
                               'model.overrides={num_nextn_predict_layers=0}']), tmp_path / "run")
    err = capfd.readouterr().err
    assert "\r" not in err and "sft: 3/3 step (100%)" in err, err[-2000:]


@pytest.fixture
def model_dir(tmp_path, tok_dir):
    tok = load_tokenizer(tok_dir)
    cfg = nanoseek.ModelConfig.preset("tiny-v3", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                      eos_token_id=tok.eos_id, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    save_pretrained(nanoseek.DeepSeekForCausalLM(cfg), tmp_path / "model")
    tok.save(tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.parametrize("argv,needle", [
    (["eval", "--model", "{model}", "--task", "arithmetic", "--examples", "3", "--set", "eval.max_new_tokens=4"],
     "eval: 3/3 sample (100%)"),
    (["rejection-sample", "--model", "{model}", "--task", "arithmetic", "--out", "{tmp}/rs", "--set",
      "rejection.prompts=2", "--set", "rejection.max_new_tokens=4"], "rejection-sample: 8/8 sample (100%)"),
    (["convert", "{model}", "--out", "{tmp}/bf16"], "convert: writing: 91/91 tensor (100%)"),
])
def test_long_commands_show_progress(model_dir, tmp_path, capfd, argv, needle):
    main([a.format(model=model_dir, tmp=tmp_path) for a in argv])
    err = capfd.readouterr().err
    assert needle in err and "\r" not in err, err[-2000:]
