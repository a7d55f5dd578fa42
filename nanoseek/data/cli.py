"""`nanoseek tokenizer train` and `nanoseek data prepare`: thin argparse front-ends to the data library.

`register(subparsers)` adds both commands; each parser sets `func`, a handler taking the parsed
namespace. User errors (bad path, empty input, bad value) print one line to stderr and exit 2.
"""
from __future__ import annotations

import argparse
import sys

from nanoseek.data.shards import DEFAULT_SHARD_TOKENS, prepare
from nanoseek.data.tokenizer import train_tokenizer

_SUFFIXES = {"K": 10**3, "M": 10**6, "G": 10**9}
_INPUT_HELP = ("a .txt/.md/.jsonl/.jsonl.gz/.json/.parquet file, a `datasets` save_to_disk folder, a directory of "
               "them, or 'stdlib' (Python's own sources); repeatable")
_TEXT_COLUMN_HELP = "the field of .jsonl/.json/.parquet/saved-dataset rows that holds the text (default text)"


def _size(text: str) -> int:
    """A positive byte count such as 2000000, 500K, 20M or 1G."""
    scale = _SUFFIXES.get(text[-1:].upper(), 1)
    number = text[:-1] if scale > 1 else text
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 2000000, 500K, 20M)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return value


def _fail(command: str, error: Exception) -> None:
    print(f"nanoseek {command}: error: {error}", file=sys.stderr)
    raise SystemExit(2)


def _tokenizer_train(args: argparse.Namespace) -> None:
    try:
        tok = train_tokenizer(args.input, args.vocab_size, args.out, max_bytes=args.max_bytes, seed=args.seed,
                              min_frequency=args.min_frequency, text_column=args.text_column)
    except (FileNotFoundError, ValueError, ImportError) as e:
        _fail("tokenizer train", e)
    print(f"tokenizer with {tok.vocab_size} tokens written to {args.out}")


def _data_prepare(args: argparse.Namespace) -> None:
    try:
        meta = prepare(args.input, args.tokenizer, args.out, val_fraction=args.val_fraction, seed=args.seed,
                       max_bytes=args.max_bytes, shard_tokens=args.shard_tokens, text_column=args.text_column)
    except (FileNotFoundError, ValueError, ImportError) as e:
        _fail("data prepare", e)
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    print(f"dataset written to {args.out}: train {train['docs']} docs / {train['tokens']} tokens, "
          f"val {val['docs']} docs / {val['tokens']} tokens ({meta['dtype']})")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `tokenizer` and `data` commands to a `nanoseek` subparsers object."""
    tokenizer = subparsers.add_parser(
        "tokenizer", help="train a byte-level BPE tokenizer with DeepSeek's special tokens",
        description="Tokenizer tools.")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", metavar="COMMAND", required=True)
    train = tokenizer_commands.add_parser(
        "train", help="train a tokenizer on local text or the built-in stdlib corpus",
        description="Train a byte-level BPE (DeepSeek LLM style: GPT-2 pre-tokenization, digits split) and write "
                    "tokenizer.json + tokenizer_config.json (with the DeepSeek-R1 chat template) to --out; "
                    "transformers.AutoTokenizer and nanoseek.load_tokenizer both load the result.")
    train.add_argument("--input", action="append", required=True, metavar="PATH", help=_INPUT_HELP)
    train.add_argument("--vocab-size", type=int, default=4096, help="tokens including the 7 special ones (default 4096)")
    train.add_argument("--out", required=True, metavar="DIR", help="output directory")
    train.add_argument("--max-bytes", type=_size, default=None, metavar="N",
                       help="train on at most N bytes of text (e.g. 20M); default: all of it")
    train.add_argument("--seed", type=int, default=0, help="seeds which files a --max-bytes sample reads (default 0)")
    train.add_argument("--min-frequency", type=int, default=2, help="smallest pair count that may become a merge")
    train.add_argument("--text-column", default="text", metavar="NAME", help=_TEXT_COLUMN_HELP)
    train.set_defaults(func=_tokenizer_train)

    data = subparsers.add_parser(
        "data", help="tokenize text into pretraining shards", description="Pretraining data tools.")
    data_commands = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    prep = data_commands.add_parser(
        "prepare", help="tokenize documents into memory-mapped token shards with a held-out split",
        description="Tokenize documents (each followed by EOS) into token shard files plus metadata.json and a "
                    "copy of the tokenizer; a seeded fraction of documents is held out for validation.")
    prep.add_argument("--input", action="append", required=True, metavar="PATH", help=_INPUT_HELP)
    prep.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer directory (from `nanoseek tokenizer train`)")
    prep.add_argument("--out", required=True, metavar="DIR", help="dataset directory (an existing dataset there is replaced)")
    prep.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents held out (default 0.01)")
    prep.add_argument("--seed", type=int, default=0, help="seeds the held-out choice and the --max-bytes sample (default 0)")
    prep.add_argument("--max-bytes", type=_size, default=None, metavar="N", help="use at most N bytes of text (e.g. 20M)")
    prep.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                      help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS})")
    prep.add_argument("--text-column", default="text", metavar="NAME", help=_TEXT_COLUMN_HELP)
    prep.set_defaults(func=_data_prepare)
