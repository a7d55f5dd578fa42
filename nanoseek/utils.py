"""Small shared helpers: atomic file writes, reading jsonl, a scoped torch thread count, progress."""
from __future__ import annotations

import gzip
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path) + ".")
    os.close(fd)
    try:
        yield tmp
        # mkstemp's (and safetensors') 0600 would keep other users and serving containers out
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def available_memory() -> int | None:
    """Bytes of memory the kernel reports available (MemAvailable), None where /proc/meminfo is not there."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """(line number, value) of each non-blank line of a .jsonl (or gzipped .jsonl.gz) file, read lazily; a
    line that is not UTF-8 or not JSON is named by its number."""
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, 1):  # bytes, decoded line by line: a bad byte is named by its line
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:{n}: not UTF-8 ({e})") from None
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                yield n, value
    except (gzip.BadGzipFile, EOFError) as e:
        raise ValueError(f"{path}: not a gzip file, or a truncated one ({e})") from None


def read_jsonl(path: str | os.PathLike, *, allow_empty: bool = False) -> list[dict]:
    """Rows of a jsonl file; a line that is not a JSON object fails with its line number. A missing or empty
    file fails too, unless `allow_empty` (then it has no rows: a run that has logged nothing yet)."""
    path = Path(path)
    if not path.is_file():
        if allow_empty:
            return []
        raise FileNotFoundError(f"data file not found: {path}")
    rows = []
    for n, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows and not allow_empty:
        raise ValueError(f"{path}: no rows")
    return rows


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict]) -> Path:
    """Rows as a jsonl file, written atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return Path(path)


@contextmanager
def torch_threads(n: int | None):
    """Run the block with `n` torch threads (None or 0: leave the count alone), restoring the count after."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or None without matplotlib (the `report` extra)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


PROGRESS_EVERY = 30.0
"""Seconds between the plain progress lines written where stderr is not a terminal (logs, CI, nohup)."""


class LineProgress:
    """tqdm's interface (update, n, set_postfix, refresh, write, close) for logs: a plain line on stderr every
    `every` seconds and one at the end, instead of a bar redrawn with carriage returns."""

    def __init__(self, total: int | None = None, initial: int = 0, desc: str = "", unit: str = "it",
                 every: float = PROGRESS_EVERY, **_):
        self.total, self.n, self.desc, self.unit, self.every = total, initial, desc, unit, every
        self.start = self.last = time.monotonic()
        self.first, self.shown, self.postfix = initial, initial, ""

    def update(self, n: int = 1) -> None:
        self.n += n
        self.refresh()

    def set_postfix(self, values: dict | None = None, refresh: bool = True, **more) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in {**(values or {}), **more}.items())
        if refresh:
            self.refresh()

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= self.every:
            self.last, self.shown = now, self.n
            done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
            share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
            rate = (self.n - self.first) / max(now - self.start, 1e-9)
            line = f"{self.desc}: {done} {self.unit}{share}, {now - self.start:.0f}s, {rate:,.2f} {self.unit}/s"
            print(line + (f", {self.postfix}" if self.postfix else ""), file=sys.stderr, flush=True)

    @staticmethod
    def write(line: str) -> None:
        print(line, flush=True)

    def close(self) -> None:
        if self.n != self.shown:
            self.refresh(force=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(enabled: bool = True, **kwargs):
    """A tqdm bar on a terminal; plain periodic lines (LineProgress) where stderr is a log; nothing when not
    `enabled`. Takes tqdm's keyword arguments (total, initial, desc, unit, ...)."""
    if enabled and not sys.stderr.isatty():
        return LineProgress(**kwargs)
    return tqdm(disable=not enabled, **kwargs)
