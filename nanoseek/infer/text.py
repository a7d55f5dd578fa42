"""Streaming text: incremental detokenization with stop strings, and the <think> reasoning split.

`IncrementalText` turns a growing list of token ids into text with constant work per token (only a
window of recent tokens is re-decoded), never emits half a UTF-8 character, finds stop strings that
span token boundaries and holds back text that may still turn into one. `ReasoningParser` splits a
DeepSeek-R1 style output into reasoning (inside <think>…</think>) and the answer, the way DeepSeek's
API returns `reasoning_content` next to `content`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from nanoseek.data.chat import END_THINK, THINK


class IncrementalText:
    def __init__(self, decode: Callable[[list[int]], str], stop_strings: Sequence[str] = ()):
        self.decode = decode
        self.stop_strings = tuple(stop_strings)
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._prefix = self._read = self._sent = 0

    def push(self, token_id: int) -> bool:
        """Append a token; True when the text now contains a stop string (the text is cut before it)."""
        self.ids.append(token_id)
        prefix = self.decode(self.ids[self._prefix:self._read])
        full = self.decode(self.ids[self._prefix:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):  # an unfinished multi-byte character
            return False
        return self._append(full[len(prefix):])

    def flush(self) -> None:
        """The sequence ended: decode whatever is still pending, unfinished characters and all."""
        if self._read < len(self.ids) and not self.stopped:
            prefix = self.decode(self.ids[self._prefix:self._read])
            self._append(self.decode(self.ids[self._prefix:])[len(prefix):])

    def _append(self, new: str) -> bool:
        before = len(self.text)
        self.text += new
        self._prefix, self._read = self._read, len(self.ids)
        if self.stop_strings:
            lo = max(0, before - max(map(len, self.stop_strings)) + 1)
            hits = [j for s in self.stop_strings if (j := self.text.find(s, lo)) >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
        return self.stopped

    def release(self, final: bool = False) -> str:
        """Text not handed out before, minus (unless final) a tail that could begin a stop string."""
        end = len(self.text) if final or self.stopped else len(self.text) - self._holdback()
        out = self.text[self._sent:end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return out

    def _holdback(self) -> int:
        best = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(self.text) - self._sent), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best


class ReasoningParser:
    """Feed text pieces, get (reasoning, content) pieces back.

    `thinking=True` when the prompt already opened the <think> block (R1's template with thinking on);
    otherwise a reply that starts with <think> opens it. Everything up to </think> is reasoning, the
    rest is content; whitespace at the start of either is dropped. Tags split across pieces are held
    back until they are complete.
    """

    def __init__(self, thinking: bool = False):
        self.state = "reasoning" if thinking else "start"
        self.opened = thinking
        """Whether the reply has a reasoning block."""
        self.buf = ""
        self._lead = {"reasoning": True, "content": True}
        self.reasoning = self.content = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        self.buf += text
        r = c = ""
        if self.state == "start":
            head = self.buf.lstrip()
            if head.startswith(THINK):
                self.state, self.buf, self.opened = "reasoning", head[len(THINK):], True
            elif THINK.startswith(head) and not final:
                return "", ""  # maybe the beginning of <think>
            else:
                self.state = "content"
        if self.state == "reasoning":
            end = self.buf.find(END_THINK)
            if end >= 0:
                r, self.buf, self.state = self.buf[:end], self.buf[end + len(END_THINK):], "content"
            else:
                keep = 0 if final else _partial_suffix(self.buf, END_THINK)
                r, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        if self.state == "content":
            c, self.buf = self.buf, ""
        r, c = self._strip("reasoning", r), self._strip("content", c)
        self.reasoning += r
        self.content += c
        return r, c

    def _strip(self, part: str, text: str) -> str:
        if self._lead[part] and text:
            text = text.lstrip()
            self._lead[part] = not text
        return text


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def split_reasoning(text: str, thinking: bool = False) -> tuple[str | None, str]:
    """(reasoning or None when the reply has no reasoning block, content) of a whole reply."""
    p = ReasoningParser(thinking)
    p.feed(text, final=True)
    return (p.reasoning if p.opened else None), p.content
