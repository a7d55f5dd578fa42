"""DeepSeek's special tokens and the DeepSeek-R1 chat format, as a Jinja template and in pure Python.

The Jinja `CHAT_TEMPLATE` goes into tokenizer_config.json for transformers / vLLM / SGLang; nanoseek
itself renders with `render_chat`, which produces the identical string (tests check they agree), so
nothing at runtime needs transformers or Jinja.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
# Order fixes the ids: bos 0, eos 1, pad 2, User 3, Assistant 4, <think> 5, </think> 6.
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT, THINK, END_THINK)
SPECIAL_TOKENS_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
_THINK_RE = re.compile(f"({re.escape(THINK)}|{re.escape(END_THINK)})")
_ROLES = ("system", "user", "assistant")

# DeepSeek-R1's template reduced to system/user/assistant: every system message is gathered in front
# (joined by a blank line), each assistant turn ends with EOS, and the generation prompt may open a
# <think> block the way R1 forces reasoning. `strip_thinking` drops everything up to </think> from
# assistant turns, as R1 does for chat history; it is off by default because SFT on reasoning traces
# must keep them. No tool-call or {% generation %} blocks, so engines with minimal Jinja render it.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system_prompt='', first=true) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if ns.first -%}{%- set ns.system_prompt = message['content'] -%}{%- set ns.first = false -%}"
    "{%- else -%}{%- set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] -%}{%- endif -%}"
    "{%- elif message['role'] not in ['user', 'assistant'] -%}"
    "{{- raise_exception('unsupported chat role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- bos_token + ns.system_prompt -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<｜User｜>' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- set content = message['content'] -%}"
    "{%- if strip_thinking is defined and strip_thinking and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1] -%}"
    "{%- endif -%}"
    "{{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<｜Assistant｜>' -}}"
    "{%- if thinking is defined and thinking -%}{{- '<think>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


def chat_segments(
    messages: Sequence[Mapping], add_generation_prompt: bool, thinking: bool, strip_thinking: bool
) -> list[tuple[str, bool, bool]]:
    """The rendered chat as (text, is_control, is_assistant_target) pieces. Only the template's own
    control tokens (and <think>/</think> inside assistant replies, which the model writes itself) are
    control pieces; system and user content is text even when it spells a special token, so a user
    cannot forge turns. Every text piece sits between control pieces, so encoding benign pieces one by
    one gives the ids of encoding their concatenation."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"chat messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"chat message {i} must be a dict with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in _ROLES:
            raise ValueError(f"chat message {i} has unsupported role {m['role']!r}; allowed: {', '.join(_ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"chat message {i} content must be a string, got {type(m['content']).__name__}")
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    segments = [(BOS, True, False), (system, False, False)]
    for m in messages:
        if m["role"] == "user":
            segments += [(USER, True, False), (m["content"], False, False)]
        elif m["role"] == "assistant":
            content = m["content"]
            if strip_thinking and END_THINK in content:
                content = content.split(END_THINK)[-1]
            segments.append((ASSISTANT, True, False))
            segments += [(piece, piece in (THINK, END_THINK), True) for piece in _THINK_RE.split(content)]
            segments.append((EOS, True, True))
    if add_generation_prompt:
        segments.append((ASSISTANT, True, False))
        if thinking:
            segments += [(THINK, True, False), ("\n", False, False)]
    return [s for s in segments if s[0]]


class RenderedChat(str):
    """A conversation rendered as one text (a corpus document) that keeps its messages, so a tokenizer
    encodes it with control tokens only where the template put them (`Tokenizer.encode_batch`)."""

    def __new__(cls, messages: Sequence[Mapping]):
        chat = super().__new__(cls, render_chat(messages, add_generation_prompt=False))
        chat.messages = messages
        return chat


def render_chat(
    messages: Sequence[Mapping],
    add_generation_prompt: bool = True,
    *,
    thinking: bool = False,
    strip_thinking: bool = False,
) -> str:
    """Render a conversation exactly as `CHAT_TEMPLATE` does, without transformers or Jinja."""
    return "".join(text for text, _, _ in chat_segments(messages, add_generation_prompt, thinking, strip_thinking))
