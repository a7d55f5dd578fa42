"""Packed-sequence batches over token shards, for pretraining and held-out evaluation.

A split's token stream (documents joined by EOS, see `nanoseek.data.shards`) is cut into windows of
seq_len + 1 + extra tokens with stride seq_len, so every token is a next-token target exactly once and
the `extra` = MTP depth D tokens at the end supply the targets for t+2 .. t+1+D (DeepSeek-V3 §2.2).
Sequences span document boundaries with no cross-document attention mask, as DeepSeek-V3 packs
pretraining documents (§4.1); the EOS between documents marks where one ends.

`PackedLoader` shuffles the windows per epoch from (seed, epoch) alone, so its position in the stream
is three integers (`state_dict`) and a restored loader continues with exactly the batches the
original would have produced. Each global step takes batch_size * world_size windows and rank r
keeps its own slice, so ranks see disjoint data.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from nanoseek.data.shards import TokenSplit


def _check_positive(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_rank(rank: int, world_size: int) -> None:
    _check_positive("world_size", world_size)
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")


class _Windows:
    """Window g of a split: tokens [g*stride, g*stride + length) of one shard; windows never cross
    shards, which costs at most length - 1 tokens per shard."""

    def __init__(self, split: TokenSplit, length: int, stride: int):
        self.split, self.length, self.stride = split, length, stride
        counts = [(len(s) - length) // stride + 1 if len(s) >= length else 0 for s in split.shards]
        self.first = np.cumsum([0] + counts)  # first global window index of each shard
        self.count = int(self.first[-1])
        if self.count == 0:
            raise ValueError(
                f"split {split.split!r} of {split.directory} has {split.n_tokens} tokens, fewer than one window of "
                f"seq_len + 1 + extra = {length} tokens (use a larger input or a shorter seq_len)"
            )

    def gather(self, indices: np.ndarray) -> torch.Tensor:
        indices = np.asarray(indices)
        shard_ids = np.searchsorted(self.first, indices, side="right") - 1
        starts = (indices - self.first[shard_ids]) * self.stride
        rows = [self.split.shards[k][s:s + self.length] for k, s in zip(shard_ids.tolist(), starts.tolist())]
        return torch.from_numpy(np.stack(rows).astype(np.int64))


class PackedLoader:
    """Endless iterator of LongTensor [batch_size, seq_len + 1 + extra] training windows."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        batch_size: int,
        seq_len: int,
        extra: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        split: str = "train",
    ):
        _check_positive("batch_size", batch_size)
        _check_positive("seq_len", seq_len)
        _check_positive("extra", extra, minimum=0)
        _check_rank(rank, world_size)
        self.batch_size, self.seq_len, self.extra = batch_size, seq_len, extra
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.split = TokenSplit(data_dir, split)
        self.windows = _Windows(self.split, seq_len + 1 + extra, seq_len)
        self.global_batch = batch_size * world_size
        if self.windows.count < self.global_batch:
            raise ValueError(
                f"split {split!r} of {data_dir} has {self.windows.count} windows of {self.windows.length} tokens, "
                f"fewer than one batch of batch_size * world_size = {self.global_batch}"
            )
        self.epoch = 0
        self.position = 0  # windows of this epoch's order already consumed, by all ranks together
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.windows.count // self.global_batch

    def _epoch_order(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.windows.count)
            self._order = (self.epoch, order)
        return self._order[1]

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> torch.Tensor:
        # The tail of an epoch too short for a full global batch is skipped, so all ranks stay in step.
        if self.position + self.global_batch > self.windows.count:
            self.epoch += 1
            self.position = 0
        start = self.position + self.rank * self.batch_size
        batch = self.windows.gather(self._epoch_order()[start:start + self.batch_size])
        self.position += self.global_batch
        return batch

    def state_dict(self) -> dict:
        """JSON-able position in the stream. It counts windows, not steps, so a run can resume with
        another batch size or world size and still see each window of the epoch once."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from `state`; its seed replaces the one given to the constructor."""
        missing = {"epoch", "position", "seed"} - set(state)
        if missing:
            raise ValueError(f"loader state is missing {sorted(missing)}; got keys {sorted(state)}")
        if not 0 <= state["position"] <= self.windows.count:
            raise ValueError(
                f"loader state position {state['position']} is outside this split's {self.windows.count} windows: "
                "was it saved for another dataset or seq_len?"
            )
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        self._order = None


class ValLoader:
    """Fixed, in-order held-out batches (re-iterable). Windows are non-shuffled with stride seq_len;
    the last batch may be smaller. Batch j goes to rank j % world_size; `max_batches` caps the
    batches of all ranks together, so the evaluated set does not depend on the world size."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        batch_size: int,
        seq_len: int,
        extra: int = 0,
        rank: int = 0,
        world_size: int = 1,
        split: str = "val",
        max_batches: int | None = None,
    ):
        _check_positive("batch_size", batch_size)
        _check_positive("seq_len", seq_len)
        _check_positive("extra", extra, minimum=0)
        _check_rank(rank, world_size)
        if max_batches is not None:
            _check_positive("max_batches", max_batches)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.split = TokenSplit(data_dir, split)
        self.windows = _Windows(self.split, seq_len + 1 + extra, seq_len)
        total = -(-self.windows.count // batch_size)
        self.total_batches = total if max_batches is None else min(total, max_batches)

    def __len__(self) -> int:
        return len(range(self.rank, self.total_batches, self.world_size))

    def __iter__(self) -> Iterator[torch.Tensor]:
        for j in range(self.rank, self.total_batches, self.world_size):
            stop = min((j + 1) * self.batch_size, self.windows.count)
            yield self.windows.gather(np.arange(j * self.batch_size, stop))
