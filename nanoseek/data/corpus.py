"""Text sources for tokenizer training and pretraining: local files and the built-in "stdlib" corpus.

Every Python install ships ~12 MB of real, varied English-and-code text: the standard library's .py
sources. The source named "stdlib" offers them as documents (one per file) so the whole pipeline runs
offline with nothing downloaded. Local sources are files or directories of .txt / .md (one document
per file), .jsonl (one per line: a "text" field, or chat "messages" rendered with DeepSeek's chat
format) and .parquet (same columns; needs pyarrow).
"""
from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from nanoseek.data.chat import RenderedChat
from nanoseek.utils import iter_jsonl

STDLIB = "stdlib"
TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")
# Tests are huge, repetitive and full of deliberately odd encodings; site-packages is not the stdlib.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files() -> list[Path]:
    """The standard library's .py files, sorted, without tests and installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(files)


def _as_list(sources) -> list:
    return [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)


def resolve_files(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Expand sources ("stdlib", files, directories searched recursively) into a file list, failing
    early on a missing path, an unsupported file type, or an empty file or directory."""
    sources = _as_list(sources)
    if not sources:
        raise ValueError("no input given: name files, directories or 'stdlib'")
    files: list[Path] = []
    for source in sources:
        if os.fspath(source) == STDLIB:
            files += stdlib_files()
            continue
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"input not found: {path} (give a file, a directory or '{STDLIB}')")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES and p.stat().st_size > 0)
            if not found:
                raise ValueError(f"input directory {path} is empty: no non-empty {'/'.join(SUFFIXES)} files in it")
            files += found
        elif path.suffix not in SUFFIXES:
            raise ValueError(f"input {path} has unsupported type {path.suffix!r}; supported: {', '.join(SUFFIXES)}")
        elif path.stat().st_size == 0:
            raise ValueError(f"input file {path} is empty")
        else:
            files.append(path)
    return files


def _record_text(record, where: str) -> str:
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record, dict) and record.get("messages") is not None:
        try:
            return RenderedChat(record["messages"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    raise ValueError(f"{where}: expected a 'text' string or a 'messages' list, got {str(record)[:80]!r}")


def _parquet_records(path: Path) -> Iterator[dict]:
    try:  # an optional dependency, needed only for parquet inputs
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow, which is not installed (pip install pyarrow)") from None
    pf = pq.ParquetFile(path)
    columns = [c for c in ("text", "messages") if c in pf.schema_arrow.names]
    if not columns:
        raise ValueError(f"{path}: needs a 'text' or 'messages' column, has {pf.schema_arrow.names}")
    for batch in pf.iter_batches(columns=columns[:1]):
        yield from batch.to_pylist()


def read_documents(path: str | os.PathLike) -> Iterator[str]:
    """The non-empty documents of one file."""
    path = Path(path)
    if path.suffix == ".jsonl":
        for lineno, record in iter_jsonl(path):
            if text := _record_text(record, f"{path}:{lineno}"):
                yield text
    elif path.suffix == ".parquet":
        for i, record in enumerate(_parquet_records(path)):
            if text := _record_text(record, f"{path} row {i}"):
                yield text
    else:
        # errors="replace": one stray byte in a large text file should not stop a pipeline.
        if text := path.read_text(encoding="utf-8", errors="replace"):
            yield text


def iter_documents(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    max_bytes: int | None = None,
    seed: int | None = None,
) -> Iterator[str]:
    """Documents (str) from `sources`, in sorted file order, or in a seeded shuffle of the files when
    `seed` is given (so a `max_bytes` cap samples the whole corpus, not its alphabetical head).
    `max_bytes` caps the total UTF-8 size; the last document is cut at a character boundary.
    Paths are checked now, so a bad one fails at the call, not at the first document."""
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    files = resolve_files(sources)
    if seed is not None:
        files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
    explicit = {Path(s) for s in _as_list(sources) if os.fspath(s) != STDLIB}
    return _documents(files, explicit, max_bytes)


def _documents(files: list[Path], explicit: set[Path], max_bytes: int | None) -> Iterator[str]:
    remaining = max_bytes
    for path in files:
        n_docs = 0
        for doc in read_documents(path):
            n_docs += 1
            if remaining is not None:
                data = doc.encode("utf-8")
                if len(data) >= remaining:
                    if last := data[:remaining].decode("utf-8", errors="ignore"):
                        yield last
                    return
                remaining -= len(data)
            yield doc
        if n_docs == 0 and path in explicit:
            raise ValueError(f"input file {path} is empty: it holds no documents")
