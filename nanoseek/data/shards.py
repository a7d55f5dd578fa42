"""Pretraining data on disk: documents tokenized once into memory-mapped token shards.

Layout of a dataset directory written by `prepare`:
    metadata.json          format, dtype, tokenizer vocab/special ids, per-split counts (docs, tokens,
                           UTF-8 bytes of text — the denominator of bits-per-byte), shard list
    train-00000.bin ...    raw little-endian token ids (uint16 when the vocab fits, else uint32)
    train-docs.npy         int64 start offset of every document in the split's token stream, plus the end
    val-00000.bin ...      the held-out documents, chosen per document by the seed
    val-docs.npy
    tokenizer/             a copy of the tokenizer, so a dataset is self-describing

Every document is followed by EOS (unless it already ends with one, as rendered chats do), so the
packed loader can cross document boundaries the way DeepSeek packs pretraining sequences while the
model still sees where one document ends. The directory is built beside `out_dir` and renamed into
place only when complete.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from nanoseek.data.corpus import iter_documents
from nanoseek.data.tokenizer import Tokenizer, load_tokenizer
from nanoseek.utils import progress_bar

FORMAT = "nanoseek-tokens"
VERSION = 1
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 per shard file
_ENCODE_BATCH_DOCS = 256
_FLUSH_TOKENS = 1 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of a `vocab_size` vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class _SplitWriter:
    """Appends documents to one split's shard files; a shard closes at a document boundary once it
    holds `shard_tokens` tokens, so no document straddles two files."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.offsets = [0]
        self.bytes = 0
        self._file = None
        self._buffer: list[list[int]] = []
        self._buffered = 0

    def add(self, ids: list[int], n_bytes: int) -> None:
        if self._file is None or self.shards[-1]["tokens"] + self._buffered >= self.shard_tokens:
            self._open_next_shard()
        self._buffer.append(ids)
        self._buffered += len(ids)
        self.offsets.append(self.offsets[-1] + len(ids))
        self.bytes += n_bytes
        if self._buffered >= _FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if self._buffered:
            self._file.write(np.concatenate([np.asarray(ids, dtype=self.dtype) for ids in self._buffer]).tobytes())
            self.shards[-1]["tokens"] += self._buffered
            self._buffer, self._buffered = [], 0

    def _open_next_shard(self) -> None:
        if self._file is not None:
            self._flush()
            self._file.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.shards.append({"file": name, "tokens": 0})
        self._file = open(self.directory / name, "wb")

    def close(self) -> dict:
        if self._file is not None:
            self._flush()
            self._file.close()
        offsets_file = f"{self.split}-docs.npy"
        np.save(self.directory / offsets_file, np.asarray(self.offsets, dtype=np.int64), allow_pickle=False)
        return {
            "docs": len(self.offsets) - 1,
            "tokens": self.offsets[-1],
            "bytes": self.bytes,
            "shards": self.shards,
            "doc_offsets": offsets_file,
        }


def _is_dataset(path: Path) -> bool:
    try:
        return json.loads((path / "metadata.json").read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def prepare(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: str | os.PathLike | Tokenizer,
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.01,
    seed: int = 0,
    max_bytes: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
    text_column: str = "text",
) -> dict:
    """Tokenize `sources` (see `nanoseek.data.corpus.iter_documents`) into a dataset at `out_dir`
    and return its metadata. `round(val_fraction * docs)` documents (at least one when the fraction
    is positive) are held out, chosen by `seed`, which also orders the files when `max_bytes` caps
    the text. An existing dataset at `out_dir` is replaced; any other non-empty directory is refused."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and (_is_dataset(out) or not any(out.iterdir()))):
        raise ValueError(f"output {out} exists and is not a nanoseek dataset or an empty directory; refusing to overwrite it")
    tokenizer_source = None if isinstance(tokenizer, Tokenizer) else str(Path(tokenizer).resolve())
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)

    # A first pass counts the documents so the held-out set has an exact, seed-determined size.
    n_docs = sum(1 for _ in iter_documents(sources, max_bytes=max_bytes, seed=seed, text_column=text_column))
    if n_docs == 0:
        raise ValueError(f"input {', '.join(map(str, sources))} is empty: it holds no documents")
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * n_docs))
    if n_val >= n_docs:
        raise ValueError(f"a held-out split needs at least 2 documents, the input has {n_docs}: give more documents "
                         "(pretraining evaluates on held-out ones), or prepare without a held-out split "
                         "(`nanoseek data prepare --val-fraction 0`)")
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[np.random.default_rng(seed).choice(n_docs, n_val, replace=False)] = True

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        dtype = token_dtype(tok.vocab_size)
        writers = {split: _SplitWriter(tmp, split, dtype, shard_tokens) for split in SPLITS}
        documents = iter_documents(sources, max_bytes=max_bytes, seed=seed, text_column=text_column)
        index = 0
        with progress_bar(progress, total=n_docs, unit="doc", desc="tokenizing") as bar:
            while batch := [doc for _, doc in zip(range(_ENCODE_BATCH_DOCS), documents)]:
                for doc, ids in zip(batch, tok.encode_batch(batch)):
                    if not ids or ids[-1] != tok.eos_id:
                        ids.append(tok.eos_id)
                    writers["val" if is_val[index] else "train"].add(ids, len(doc.encode("utf-8")))
                    index += 1
                bar.update(len(batch))
        splits = {split: w.close() for split, w in writers.items()}
        tok.save(tmp / "tokenizer")
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
            "tokenizer": "tokenizer",
            "tokenizer_source": tokenizer_source,
            "sources": [os.fspath(s) for s in sources],
            "max_bytes": max_bytes,
            "seed": seed,
            "val_fraction": val_fraction,
            "shard_tokens": shard_tokens,
            "splits": splits,
        }
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def load_metadata(data_dir: str | os.PathLike) -> dict:
    """metadata.json of a dataset directory written by `prepare`."""
    path = Path(data_dir) / "metadata.json"
    if not path.is_file():
        raise FileNotFoundError(f"no dataset at {data_dir}: {path} not found (run `nanoseek data prepare`)")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a nanoseek token dataset (format {meta.get('format')!r}, expected {FORMAT!r})")
    return meta


def check_vocab(meta: Mapping | str | os.PathLike, model_vocab_size: int) -> None:
    """Fail unless every token id of the dataset indexes into a `model_vocab_size` embedding. A larger
    model vocabulary is fine: DeepSeek pads its 100015-token vocabulary to 102400 for efficiency."""
    if not isinstance(meta, Mapping):
        meta = load_metadata(meta)
    if meta["vocab_size"] > model_vocab_size:
        raise ValueError(
            f"tokenizer vocab_size {meta['vocab_size']} is larger than the model's vocab_size {model_vocab_size}: "
            f"token ids up to {meta['vocab_size'] - 1} would index past the embedding table"
        )


class TokenSplit:
    """One split of a dataset: its shards as read-only memory maps (in order) and its document offsets."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train"):
        self.directory = Path(data_dir)
        self.meta = load_metadata(data_dir)
        if split not in self.meta["splits"]:
            raise ValueError(f"dataset {data_dir} has no split {split!r}; it has {', '.join(self.meta['splits'])}")
        self.split = split
        info = self.meta["splits"][split]
        self.dtype = np.dtype(self.meta["dtype"])
        self.n_docs, self.n_tokens, self.n_bytes = info["docs"], info["tokens"], info["bytes"]
        self.shards: list[np.ndarray] = []
        for shard in info["shards"]:
            path = self.directory / shard["file"]
            expected = shard["tokens"] * self.dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                found = path.stat().st_size if path.is_file() else "missing"
                raise ValueError(f"shard {path} should hold {expected} bytes, found {found}: the dataset is damaged")
            if shard["tokens"]:
                self.shards.append(np.memmap(path, dtype=self.dtype, mode="r", shape=(shard["tokens"],)))
        self._offsets_path = self.directory / info["doc_offsets"]

    def doc_offsets(self) -> np.ndarray:
        """int64 [docs + 1]: document d is tokens[offsets[d]:offsets[d + 1]] of the concatenated split."""
        return np.load(self._offsets_path, mmap_mode="r", allow_pickle=False)

    def tokens(self) -> np.ndarray:
        """The whole split as one in-memory array (for inspection and tests, not for training)."""
        return np.concatenate(self.shards) if self.shards else np.zeros(0, dtype=self.dtype)
