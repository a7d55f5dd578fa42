"""Text sources for tokenizer training and pretraining: local files and the built-in "stdlib" corpus.

Every Python install ships ~12 MB of real, varied English-and-code text: the standard library's .py
sources. The source named "stdlib" offers them as documents (one per file) so the whole pipeline runs
offline with nothing downloaded. Local sources are files or directories of .txt / .md (one document
per file) and record files (`nanoseek.data.files`: .jsonl, .jsonl.gz, .parquet, `datasets` save_to_disk
folders; .json when named itself), one document per row: its text column ("text" unless named), or chat
"messages" rendered with DeepSeek's chat format.
"""
from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from nanoseek.data.chat import RenderedChat
from nanoseek.data.files import (
    KINDS,
    is_record_source,
    is_saved_dataset,
    iter_records,
    record_suffix,
)

STDLIB = "stdlib"
TEXT_SUFFIXES = (".txt", ".md")
# What a directory is searched for: a .json there is as likely a config file as data, so only named ones are read.
SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".jsonl.gz", ".parquet")
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
        if is_saved_dataset(path):
            files.append(path)
        elif path.is_dir():
            found = _search(path)
            if not found:
                raise ValueError(f"input directory {path} is empty: no non-empty {'/'.join(SUFFIXES)} files or "
                                 "saved datasets in it")
            files += found
        elif not (path.suffix in TEXT_SUFFIXES or is_record_source(path)):
            raise ValueError(f"input {path} has unsupported type {path.suffix!r}; supported: "
                             f"{', '.join(TEXT_SUFFIXES)}, {KINDS}")
        elif path.stat().st_size == 0:
            raise ValueError(f"input file {path} is empty")
        else:
            files.append(path)
    return files


def _search(directory: Path) -> list[Path]:
    """The non-empty corpus files below `directory`, a saved dataset folder counting as one."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        if is_saved_dataset(dirpath):
            found.append(Path(dirpath))
            dirnames.clear()
            continue
        dirnames.sort()
        for f in filenames:
            p = Path(dirpath) / f
            if (p.suffix in TEXT_SUFFIXES or record_suffix(p) in SUFFIXES) and p.stat().st_size > 0:
                found.append(p)
    return sorted(found)


def _record_text(record, where: str, text_column: str = "text") -> str:
    if isinstance(record, dict) and isinstance(record.get(text_column), str):
        return record[text_column]
    if isinstance(record, dict) and record.get("messages") is not None:
        try:
            return RenderedChat(record["messages"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    raise ValueError(f"{where}: expected a {text_column!r} string or a 'messages' list, got {str(record)[:80]!r}")


def read_documents(path: str | os.PathLike, text_column: str = "text") -> Iterator[str]:
    """The non-empty documents of one file (or saved dataset): a record source's `text_column` (or its chat
    'messages'), a text file whole."""
    path = Path(path)
    if is_record_source(path):
        for where, record in iter_records(path, columns=[text_column, "messages"]):
            if text := _record_text(record, where, text_column):
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
    text_column: str = "text",
) -> Iterator[str]:
    """Documents (str) from `sources`, in sorted file order, or in a seeded shuffle of the files when
    `seed` is given (so a `max_bytes` cap samples the whole corpus, not its alphabetical head).
    `max_bytes` caps the total UTF-8 size; the last document is cut at a character boundary.
    `text_column` names the field of record files that holds a document's text.
    Paths are checked now, so a bad one fails at the call, not at the first document."""
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    files = resolve_files(sources)
    if seed is not None:
        files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
    explicit = {Path(s) for s in _as_list(sources) if os.fspath(s) != STDLIB}
    return _documents(files, explicit, max_bytes, text_column)


def _documents(files: list[Path], explicit: set[Path], max_bytes: int | None, text_column: str) -> Iterator[str]:
    remaining = max_bytes
    for path in files:
        n_docs = 0
        for doc in read_documents(path, text_column):
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
