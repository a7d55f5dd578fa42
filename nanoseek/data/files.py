"""The one reader of record files, shared by every command that takes a data file: corpora (`tokenizer train`,
`data prepare`, pretraining sources), post-training data (`sft`, `dpo`, `distill` traces) and data-file tasks.

A record source is a .jsonl or .jsonl.gz file (one JSON object per line), a .json file (a list of objects),
a .parquet file, or a folder written by `datasets`' `save_to_disk` (its .arrow files, in order). Parquet and
Arrow need pyarrow (an optional dependency); the rest is the standard library. Every error names the file,
and the line or row where there is one.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from nanoseek.utils import iter_jsonl

RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
KINDS = ".jsonl, .jsonl.gz, .json, .parquet or a `datasets` save_to_disk folder"


def record_suffix(path: str | os.PathLike) -> str | None:
    """The record-file suffix `path` ends with, or None."""
    name = os.fspath(path)
    return next((s for s in RECORD_SUFFIXES if name.endswith(s)), None)


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """A `datasets` save_to_disk folder: state.json naming its .arrow files (a Dataset, or a DatasetDict's split)."""
    return (Path(path) / "state.json").is_file() and (Path(path) / "dataset_info.json").is_file()


def is_record_source(path: str | os.PathLike) -> bool:
    return record_suffix(path) is not None or is_saved_dataset(path)


def _pyarrow(path: Path):
    try:  # an optional dependency, needed only for parquet and arrow data
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow, which is not installed (pip install pyarrow)") from None
    return pa, pq


def _jsonl(path: Path) -> Iterator[tuple[str, object]]:
    for n, value in iter_jsonl(path):
        yield f"{path}:{n}", value


def _json(path: Path) -> Iterator[tuple[str, object]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a UTF-8 JSON file ({e})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of objects (one per row), got a {type(rows).__name__}")
    for i, row in enumerate(rows):
        yield f"{path} row {i}", row


def _arrow_rows(path: Path, batches) -> Iterator[tuple[str, object]]:
    i = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield f"{path} row {i}", row
            i += 1


def _parquet(path: Path, columns: list[str] | None) -> Iterator[tuple[str, object]]:
    pa, pq = _pyarrow(path)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a parquet file ({e})") from None
    if columns is not None:
        columns = [c for c in columns if c in pf.schema_arrow.names]
    yield from _arrow_rows(path, pf.iter_batches(columns=columns))


def _saved_dataset(path: Path, columns: list[str] | None) -> Iterator[tuple[str, object]]:
    pa, _ = _pyarrow(path)
    try:
        files = [path / f["filename"] for f in json.loads((path / "state.json").read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path / 'state.json'}: not a `datasets` save_to_disk state ({e})") from None
    i = 0
    for file in files:
        if os.path.dirname(os.path.relpath(file, path)) or not file.is_file():
            raise ValueError(f"{path / 'state.json'} lists {file.name}, which is not a file in {path}")
        with pa.memory_map(str(file)) as source:
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid as e:
                raise ValueError(f"{file}: not an Arrow stream ({e})") from None
            for batch in reader:
                if columns is not None:
                    batch = batch.select([c for c in columns if c in batch.schema.names])
                for row in batch.to_pylist():
                    yield f"{path} row {i}", row
                    i += 1


def iter_records(path: str | os.PathLike, columns: list[str] | None = None) -> Iterator[tuple[str, object]]:
    """(where, row) for each row of a record source, lazily (a .json file is parsed whole); `where` names the
    file and line or row for error messages. `columns` limits a parquet or arrow read to those present."""
    path = Path(path)
    if is_saved_dataset(path):
        return _saved_dataset(path, columns)
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise ValueError(f"{path} is a `datasets` DatasetDict: name one split's folder, e.g. {path / (splits or ['train'])[0]}")
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = record_suffix(path)
    if suffix is None or not path.is_file():
        raise ValueError(f"{path}: unsupported data file; expected {KINDS}")
    if suffix == ".json":
        return _json(path)
    if suffix == ".parquet":
        return _parquet(path, columns)
    return _jsonl(path)


def read_rows(path: str | os.PathLike, fields: Mapping[str, str] | None = None, option: str = "fields"
              ) -> list[dict]:
    """Every row of a record source, each a JSON object; an empty source fails. `fields` maps a field the caller
    reads to the file's column that holds it (e.g. {"prompt": "question"}): those columns come renamed; `option`
    names the setting in errors."""
    rows = []
    for where, row in iter_records(path):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object (a row with named fields), got {type(row).__name__}")
        if fields:
            missing = next((ours for ours, column in fields.items() if column not in row), None)
            if missing is not None:
                raise ValueError(f"{where}: no column {fields[missing]!r} ({option}.{missing}); it has "
                                 f"{', '.join(sorted(row))}")
            row = {**{k: v for k, v in row.items() if k not in fields.values()},
                   **{ours: row[column] for ours, column in fields.items()}}
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows
