"""The token dataset of a pretraining run: a prepared directory, or one built (once) from text sources.

With `[data] dataset` empty, the run trains a byte-level BPE of the model's vocabulary size on
`sources` (default: the built-in "stdlib" corpus) unless `[model] tokenizer` names one, tokenizes the
sources into shards (`nanoseek.data.prepare`) and reuses the result on later runs: it lives in
`[data] cache_dir` (or DIR/data) under a name made of what determines it. The held-out split is
chosen with seed 0 whatever the training seed, so runs with different seeds score the same text.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from nanoseek.data.corpus import resolve_files
from nanoseek.data.shards import load_metadata, prepare
from nanoseek.data.tokenizer import load_tokenizer, train_tokenizer

DATA_SEED = 0


def _slug(sources: list[str]) -> str:
    names = [Path(s).name or "root" for s in sources]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "+".join(names))[:40]


def dataset_key(sources: list[str], tokenizer: str, vocab_size: int, max_bytes: int, val_fraction: float,
                text_column: str = "text") -> str:
    """A directory name determined by everything that shapes the built dataset."""
    ident = {"sources": [s if s == "stdlib" else os.path.abspath(s) for s in sources],
             "tokenizer": os.path.abspath(tokenizer) if tokenizer else None, "vocab_size": vocab_size,
             "max_bytes": max_bytes or None, "val_fraction": val_fraction, "seed": DATA_SEED}
    if text_column != "text":  # (so the datasets built before this field keep their names)
        ident["text_column"] = text_column
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
    return f"{_slug(sources)}-v{vocab_size}-{digest}"


def resolve_dataset(data_cfg, tokenizer_dir: str, run_dir: str | os.PathLike, vocab_size: int,
                    progress: bool = True) -> Path:
    """Path of the run's prepared dataset (tokenized with `tokenizer_dir`, or a BPE of `vocab_size` trained on
    the sources when it is ""), building it first if needed. Fails early and clearly on a
    missing dataset directory, missing or empty sources, or a missing tokenizer."""
    if data_cfg.dataset:
        path = Path(data_cfg.dataset)
        if not path.exists():
            raise FileNotFoundError(f"data.dataset = {data_cfg.dataset!r}: directory not found (prepare one with "
                                "`nanoseek data prepare`, or leave it empty to build from data.sources)")
        load_metadata(path)  # raises with a clear message when it is not a dataset
        return path

    if not data_cfg.sources:
        raise ValueError("data.sources is empty and data.dataset is not set: name text files, directories or 'stdlib'")
    resolve_files(data_cfg.sources)  # missing paths and empty files fail here, before any work
    if tokenizer_dir and not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"model.tokenizer = {tokenizer_dir!r}: no tokenizer.json there")
    key = dataset_key(data_cfg.sources, tokenizer_dir, vocab_size, data_cfg.max_bytes, data_cfg.val_fraction,
                      data_cfg.text_column)
    root = Path(data_cfg.cache_dir) if data_cfg.cache_dir else Path(run_dir) / "data"
    path = root / key
    if (path / "metadata.json").is_file():
        load_metadata(path)
        return path
    max_bytes = data_cfg.max_bytes or None
    if tokenizer_dir:
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        tok_dir = root / f"{key}-tokenizer"
        if (tok_dir / "tokenizer.json").is_file():
            tokenizer = load_tokenizer(tok_dir)
        else:
            tokenizer = train_tokenizer(data_cfg.sources, vocab_size, tok_dir, max_bytes=max_bytes, seed=DATA_SEED,
                                        progress=progress, text_column=data_cfg.text_column)
    prepare(data_cfg.sources, tokenizer, path, val_fraction=data_cfg.val_fraction, seed=DATA_SEED,
            max_bytes=max_bytes, progress=progress, text_column=data_cfg.text_column)
    return path
