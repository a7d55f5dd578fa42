"""`nanoseek chat` and `nanoseek generate`: streamed replies with the thinking shown apart."""
import io
import json
import shutil

import pytest
import torch

import nanoseek
from infer_fixtures import ANSWER, REASONING, REPLY, chat_model_dir
from nanoseek.cli import main
from nanoseek.infer.chat import DIM, RESET, chat_loop
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.interop.hf import load_pretrained


def _scripted(lines):
    it = iter(lines)

    def read(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read


def test_chat_loop_streams_reasoning_apart_and_resets():
    path = chat_model_dir()
    model, tok = load_pretrained(path), nanoseek.load_tokenizer(path)
    engine = Engine(model, tok, speculative=True)
    out = io.StringIO()
    messages = chat_loop(engine, tok, SamplingParams(max_new_tokens=40), input_fn=_scripted(
        ["What is 2+2?", "/help", "", "hello", "/reset", "ok", "/exit", "never read"]), out=out, color=True, stats=True)
    text = out.getvalue()
    # dimmed thinking, then the answer (the second turn, with history, is beyond what this tiny model learned)
    assert text.count(f"{DIM}{REASONING}\n{RESET}\n\n{ANSWER}\n") >= 2 and text.count(">>> ") == 0
    assert "(conversation reset)" in text and "tokens/s" in text and "drafts accepted" in text
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] == "ok"
    assert messages[1]["content"].endswith(ANSWER) and REASONING in messages[1]["content"]
    # without colors the thinking is set off by tags; end of input ends the chat
    out = io.StringIO()
    chat_loop(engine, tok, SamplingParams(max_new_tokens=40), input_fn=_scripted(["why?"]), out=out, thinking=True)
    assert f"<think>\n{REASONING}\n\n</think>\n\n{ANSWER}\n" in out.getvalue()


def test_chat_loop_refuses_an_overlong_conversation():
    path = chat_model_dir()
    model, tok = load_pretrained(path), nanoseek.load_tokenizer(path)
    out = io.StringIO()
    messages = chat_loop(Engine(model, tok), tok, SamplingParams(max_new_tokens=40),
                         input_fn=_scripted(["x " * 200, "/exit"]), out=out)
    assert "over this model's context" in out.getvalue() and messages == []


@pytest.mark.parametrize("extra,expected", [
    (["--chat", "--stream", "--color", "never"], f"<think>\n{REASONING}\n\n</think>\n\n{ANSWER}\n"),
    (["--chat", "--color", "always", "--speculative", "--stats"], f"{DIM}{REASONING}\n{RESET}\n\n{ANSWER}\n"),
    (["--chat", "--stop", "plus", "--no-compile"], "<think>\nTwo \n</think>\n\n\n"),
])
def test_generate_command(capsys, extra, expected):
    torch.manual_seed(0)
    main(["generate", "--model", chat_model_dir(), "--prompt", "What is 2+2?", "--max-new-tokens", "40", *extra])
    out, err = capsys.readouterr()
    assert out == expected
    if "--stats" in extra:
        assert "tokens/s" in err and "draft acceptance" in err


def test_generate_command_raw_prompt(capsys):
    tok = nanoseek.load_tokenizer(chat_model_dir())
    prompt = tok.render_chat([{"role": "user", "content": "hello"}])[len("<｜begin▁of▁sentence｜>"):]
    main(["generate", "--model", chat_model_dir(), "--prompt", prompt, "--stream"])
    assert capsys.readouterr().out == REPLY + "\n"


def test_generate_caps_new_tokens_at_the_context(capsys, tmp_path):
    """A reply cannot run past the model's positions: --max-new-tokens is cut to what the context leaves (with a
    note), and a prompt that fills the context is a one-line error."""
    model_dir = shutil.copytree(chat_model_dir(), tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 40}))
    main(["generate", "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "1000", "--ignore-eos",
          "--stats"])
    err = capsys.readouterr().err
    room = 40 - len(nanoseek.load_tokenizer(model_dir).encode("hi", add_bos=True))
    assert f"capped at {room}" in err and f"\n{room} tokens in" in err
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(model_dir), "--prompt", "hi " * 60])
    assert "this model's context is 40" in capsys.readouterr().err
