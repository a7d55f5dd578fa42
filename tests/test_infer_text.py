"""Streaming text: incremental detokenization, stop strings across tokens, the <think> split."""
import pytest

from nanoseek.infer.text import IncrementalText, ReasoningParser, split_reasoning


class ByteTokenizer:
    """Each token is one UTF-8 byte, so multi-byte characters span tokens."""

    @staticmethod
    def encode(text):
        return list(text.encode())

    @staticmethod
    def decode(ids):
        return bytes(ids).decode(errors="replace")


def _stream(text, stops=(), chunk=1):
    t = IncrementalText(ByteTokenizer.decode, stops)
    out, pieces = "", []
    for b in ByteTokenizer.encode(text):
        if t.push(b):
            break
        pieces.append(t.release())
    t.flush()
    pieces.append(t.release(final=True))
    return "".join(pieces), pieces, t


def test_incremental_text_never_splits_characters():
    text = "héllo wörld — 你好 👋"
    joined, pieces, _ = _stream(text)
    assert joined == text and all("\ufffd" not in p for p in pieces)


def test_stop_strings_span_tokens_and_are_held_back():
    joined, pieces, t = _stream("abc STOP def", stops=["STOP"])
    assert joined == "abc " and t.stopped
    assert not any("S" in p for p in pieces)  # "S", "ST", "STO" were held back, never sent
    joined, _, t = _stream("a STOx STOP", stops=["STOP", "xyz"])
    assert joined == "a STOx " and t.stopped
    joined, _, t = _stream("no stop here", stops=["zzz"])
    assert joined == "no stop here" and not t.stopped


@pytest.mark.parametrize("chunks", [1, 3, 100])
@pytest.mark.parametrize("thinking,text,reasoning,content", [
    (False, "<think>\nLet me see.\n</think>\n\nIt is 4.", "Let me see.\n", "It is 4."),
    (True, "Let me see.\n</think>\n\nIt is 4.", "Let me see.\n", "It is 4."),
    (False, "Just an answer.", None, "Just an answer."),
    (False, "  <think>unfinished thought", "unfinished thought", ""),
    (False, "<thin", None, "<thin"),
])
def test_reasoning_parser(chunks, thinking, text, reasoning, content):
    p = ReasoningParser(thinking)
    r = c = ""
    pieces = [text[i:i + chunks] for i in range(0, len(text), chunks)]
    for i, piece in enumerate(pieces):
        dr, dc = p.feed(piece, final=i == len(pieces) - 1)
        r, c = r + dr, c + dc
        assert "<think>" not in dr + dc and "</think>" not in dr + dc
    assert (r if p.opened else None, c) == (reasoning, content) == split_reasoning(text, thinking)
