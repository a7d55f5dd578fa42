"""Byte-level BPE tokenizer with DeepSeek's special tokens and chat format.

DeepSeek LLM (2401.02954, §2.1) trains a byte-level BPE with the HF `tokenizers` library, pre-tokenizes
like GPT-2 so merges never cross character categories, and splits numbers into individual digits;
`train_tokenizer` does the same at any vocabulary size. The special tokens and the chat format are
DeepSeek-V3 / R1's, so a directory written here loads in `transformers.AutoTokenizer` and a real
DeepSeek tokenizer directory loads in `load_tokenizer`.

At runtime nanoseek only needs `tokenizers`; the chat format lives in `nanoseek.data.chat`.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from nanoseek.data.chat import (
    ASSISTANT, BOS, CHAT_TEMPLATE, END_THINK, EOS, PAD, SPECIAL_TOKENS, SPECIAL_TOKENS_RE, THINK, USER, RenderedChat,
    chat_segments, render_chat,
)
from nanoseek.data.corpus import iter_documents
from nanoseek.utils import atomic_path

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens
# Added tokens that are not "special", as in DeepSeek-R1's tokenizer: decode(skip_special_tokens=True),
# which evaluation harnesses and serving stacks call, keeps the reasoning tags.
PLAIN_ADDED_TOKENS = (THINK, END_THINK)
PROMPT_FORMAT_KEY = "nanoseek_prompt_format"
# The BPE trainer allocates ~57 bytes per requested token before reading any text (5e9 asked for 283 GB and
# aborted the process); 2^24 is 130x DeepSeek-V3's 129,280 and costs under 1 GB.
MAX_VOCAB_SIZE = 1 << 24


def _token_content(value) -> str | None:
    # tokenizer_config.json stores special tokens either as strings or as AddedToken dicts.
    return value.get("content") if isinstance(value, Mapping) else value


def default_tokenizer_config() -> dict:
    """tokenizer_config.json for a tokenizer trained here (transformers' generic fast tokenizer)."""
    decoder = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": t not in PLAIN_ADDED_TOKENS}
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,  # as DeepSeek's tokenizers: the models are trained with BOS in front
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": decoder,
        "chat_template": CHAT_TEMPLATE,
    }


class Tokenizer:
    """A `tokenizers.Tokenizer` plus DeepSeek's special-token ids and chat format.

    `encode` never adds special tokens on its own (pass add_bos/add_eos), but special-token strings in
    the text are recognised (raw prompts may spell the chat format); `encode_text` never recognises them,
    and the chat methods encode system and user content with it.
    """

    def __init__(self, backend: tokenizers.Tokenizer, config: dict | None = None):
        self.backend = backend
        self.config = dict(config) if config is not None else default_tokenizer_config()
        bos = _token_content(self.config.get("bos_token")) or BOS
        eos = _token_content(self.config.get("eos_token")) or EOS
        pad = _token_content(self.config.get("pad_token")) or PAD
        # A DeepSeek-V3 base tokenizer has no <think> tokens (R1 added them), hence None is allowed there.
        self.special_ids: dict[str, int | None] = {
            name: backend.token_to_id(token)
            for name, token in (("bos", bos), ("eos", eos), ("pad", pad), ("user", USER), ("assistant", ASSISTANT),
                                ("think", THINK), ("end_think", END_THINK))
        }
        for name, token in (("bos", bos), ("eos", eos)):
            if self.special_ids[name] is None:
                raise ValueError(f"tokenizer has no {name} token {token!r} in its vocabulary")

    @property
    def bos_id(self) -> int:
        return self.special_ids["bos"]

    @property
    def eos_id(self) -> int:
        return self.special_ids["eos"]

    @property
    def pad_id(self) -> int:
        # Some tokenizers ship without a pad token; padding with EOS is the usual stand-in and is masked anyway.
        pad = self.special_ids["pad"]
        return self.eos_id if pad is None else pad

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = _encode_one(self.backend, text)
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    @functools.cached_property
    def _text_backend(self) -> tokenizers.Tokenizer:
        # `tokenizers` matches added tokens in any text it encodes, special or not (`encode_special_tokens`
        # covers only the special ones), so plain text goes through a copy without the added vocabulary:
        # normalizer, pre-tokenizer and model unchanged, and merges never build a control token.
        spec = json.loads(self.backend.to_str())
        spec["added_tokens"] = []
        return tokenizers.Tokenizer.from_str(json.dumps(spec))

    def encode_text(self, text: str) -> list[int]:
        """Ids of `text` as plain text: a special-token string in it is encoded as its characters."""
        return _encode_one(self._text_backend, text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (the Rust backend spreads them over all cores); a `RenderedChat`
        (a chat record of a corpus) is encoded from its messages, as `encode_chat` does."""
        plain = self.backend.encode_batch([t for t in texts if not isinstance(t, RenderedChat)],
                                          add_special_tokens=False)
        plain_ids = (e.ids for e in plain)
        return [self.encode_chat(t.messages)[0] if isinstance(t, RenderedChat) else next(plain_ids) for t in texts]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[Mapping], add_generation_prompt: bool = True, *,
                    thinking: bool = False, strip_thinking: bool = False) -> str:
        return render_chat(messages, add_generation_prompt, thinking=thinking, strip_thinking=strip_thinking)

    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = True, *,
                            thinking: bool = False, strip_thinking: bool = False) -> list[int]:
        """Token ids of the rendered conversation (starts with BOS; no other tokens are added)."""
        return self.encode_chat(messages, add_generation_prompt, thinking=thinking, strip_thinking=strip_thinking)[0]

    def encode_chat(self, messages: Sequence[Mapping], add_generation_prompt: bool = False, *,
                    thinking: bool = False, strip_thinking: bool = False) -> tuple[list[int], list[int]]:
        """(ids, assistant_mask): control tokens come only from the template (see `chat_segments`); mask is
        1 on the tokens an SFT loss trains on (each assistant reply and its closing EOS) and 0 on prompts
        and role markers."""
        ids: list[int] = []
        mask: list[int] = []
        for text, is_control, is_target in chat_segments(messages, add_generation_prompt, thinking, strip_thinking):
            control_id = self.token_to_id(text) if is_control else None
            # a control token this vocabulary lacks (<think> in a V3 base tokenizer) is written out as text
            piece = [control_id] if control_id is not None else self.encode_text(text)
            ids += piece
            mask += [int(is_target)] * len(piece)
        return ids, mask

    @property
    def prompt_format(self) -> dict:
        """The task prompt format a model was trained with ({"template", "prefill_think"}; {} if none was
        recorded): kept in tokenizer_config.json beside the chat template, so eval and serve follow it."""
        return dict(self.config.get(PROMPT_FORMAT_KEY) or {})

    def record_prompt_format(self, fmt: Mapping) -> None:
        self.config[PROMPT_FORMAT_KEY] = dict(fmt)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (each atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        special_map = {k: self.config[k] for k in ("bos_token", "eos_token", "pad_token") if k in self.config}
        files = {
            "tokenizer.json": self.backend.to_str(pretty=True),
            "tokenizer_config.json": json.dumps(self.config, indent=2, ensure_ascii=False),
            "special_tokens_map.json": json.dumps(special_map, indent=2, ensure_ascii=False),
        }
        for name, text in files.items():
            with atomic_path(directory / name) as tmp:
                Path(tmp).write_text(text + "\n", encoding="utf-8")
        return directory

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})"


def _encode_one(backend: tokenizers.Tokenizer, text: str) -> list[int]:
    # encode_batch releases the GIL (encode holds it throughout): a long text tokenized on a worker thread
    # (the server's) then does not stall every other Python thread, the event loop included
    return backend.encode_batch([text], add_special_tokens=False)[0].ids


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Load tokenizer.json (+ tokenizer_config.json when present) from a tokenizer or model directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {directory}")
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {directory} (expected {path})")
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception for any file it cannot parse
        raise ValueError(f"{path} is not a valid tokenizer file ({e})") from None
    config_path = directory / "tokenizer_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    return Tokenizer(backend, config)


def _without_special_tokens(texts: Iterable[str]) -> Iterator[str]:
    # The BPE trainer counts special-token strings as ordinary text (wasting merges on "<｜" etc.),
    # so rendered chats are cut at them and the pieces are trained on separately.
    for text in texts:
        yield from (piece for piece in SPECIAL_TOKENS_RE.split(text) if piece)


def train_tokenizer_from_texts(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike | None = None,
    *,
    min_frequency: int = 2,
    progress: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (special tokens included) on an iterable of
    documents; save it to `out_dir` when given. A corpus too small for that many merges yields fewer."""
    if not isinstance(vocab_size, int) or not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be an integer >= {MIN_VOCAB_SIZE} (256 byte tokens + {len(SPECIAL_TOKENS)} special) "
            f"and <= {MAX_VOCAB_SIZE:,}, got {vocab_size!r}"
        )
    texts = iter(texts)
    first = next(texts, None)
    if first is None:
        raise ValueError("tokenizer training input is empty: no documents to train on")

    def all_texts():
        yield first
        yield from texts

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        # Every byte gets a token up front, so any text encodes and decodes back exactly.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress and sys.stderr.isatty(),  # its bar has no plain-log form
    )
    backend.train_from_iterator(_without_special_tokens(all_texts()), trainer)
    # What transformers adds with add_special_tokens=True (its default): BOS in front, as the models were
    # trained; nanoseek's own encode never asks for it (add_bos says).
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, backend.token_to_id(BOS))])
    spec = json.loads(backend.to_str())
    for added in spec["added_tokens"]:
        added["special"] = added["content"] not in PLAIN_ADDED_TOKENS
    tok = Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)))
    if out_dir is not None:
        tok.save(out_dir)
    return tok


def train_tokenizer(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    vocab_size: int,
    out_dir: str | os.PathLike | None = None,
    *,
    max_bytes: int | None = None,
    seed: int | None = 0,
    min_frequency: int = 2,
    progress: bool = True,
    text_column: str = "text",
) -> Tokenizer:
    """Train on local files/directories (text and record files, see `nanoseek.data.corpus`) and/or the built-in
    "stdlib" corpus. `max_bytes` caps the text used; `seed` picks which files a capped run reads; `text_column`
    names the records' text field (see `nanoseek.data.corpus.iter_documents`)."""
    documents = iter_documents(sources, max_bytes=max_bytes, seed=seed, text_column=text_column)
    return train_tokenizer_from_texts(documents, vocab_size, out_dir, min_frequency=min_frequency, progress=progress)
