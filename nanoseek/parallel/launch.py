"""Run a function on N local gloo ranks in fresh processes: the multi-process tests and benchmarks.

    results = run_ranks(worker, world_size=2, args=(cfg_dict, tmp_path))   # [worker's return on rank r]

(Training jobs use torchrun; this is for a function, e.g. one layout of a test, on one machine.)

Each rank is a spawned process with 1 thread that joins a gloo group through a file store under a
fresh temporary directory, so nothing listens beyond localhost and no port is chosen by hand. The
whole job has a deadline: past it, or when a rank fails, the remaining ranks started here are killed
(by their own process handles) and the test fails with every rank's error.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(fn, rank: int, world_size: int, store: str, out: str, args: tuple) -> None:
    os.environ.update(GLOO_SOCKET_IFNAME="lo", RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=60))
        result = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 (reported to the parent)
        result = ("error", traceback.format_exc())
    with open(out, "wb") as f:
        pickle.dump(result, f)
    if result[0] == "error":
        os._exit(1)  # at once: the parent then stops the ranks that wait on this one
    dist.destroy_process_group()


def run_ranks(fn, world_size: int, args: tuple = (), timeout: float = 120.0) -> list:
    """fn(rank, world_size, *args) on each rank (a module-level function); returns the results by rank, or
    raises RuntimeError with each failed rank's traceback."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="nanoseek-dist-") as tmp:
        outs = [os.path.join(tmp, f"rank{r}.pkl") for r in range(world_size)]
        procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, os.path.join(tmp, "store"), outs[r], args),
                             daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
                if any(p.exitcode not in (None, 0) for p in procs):
                    break  # one rank died: the others would wait on it until the gloo timeout
                time.sleep(0.05)
        finally:
            timed_out = [r for r, p in enumerate(procs) if p.is_alive()]
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(5)
        results, errors = [], []
        for r in range(world_size):
            if not Path(outs[r]).is_file():
                errors.append(f"rank {r}: no result (exit code {procs[r].exitcode})")
                results.append(None)
                continue
            status, value = pickle.loads(Path(outs[r]).read_bytes())
            if status == "error":
                errors.append(f"rank {r}:\n{value}")
            results.append(value)
        if timed_out or errors:
            head = (f"ranks {timed_out} stopped (killed) " + ("after another rank failed" if errors else
                    f"still running after {timeout:.0f}s") + "\n") if timed_out else ""
            raise RuntimeError(head + "\n".join(errors))
        return results
