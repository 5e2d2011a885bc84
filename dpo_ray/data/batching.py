"""A worker's shard -> shuffled (optionally length-bucketed) collated batches.

Rows are read from the shard in pools of ``pool × batch_size`` rows. Each pool is permuted with a
generator seeded by (seed, epoch) -- the same order for the same seed and epoch -- and, with
``length_bucketing``, sorted by length, cut into batches, and the batches shuffled again, so a batch
holds rows of similar length and pads less. ``length_bucketing: auto`` (opt-in; off by default, as TRL)
decides per pool from the pool's own lengths: bucketed when that pads at least ``AUTO_MIN_SAVING`` fewer of
the pool's tokens than the shuffled batches would; a decision from the data and the seeded order only, so runs
stay reproducible. Only the shard's final partial batch is dropped: rows a pool cannot fill a batch with wait
for the next pool, however the stream is cut into blocks, so a shard of R rows gives exactly
``R // batch_size`` batches. With ``streaming_split(equal=True)`` every worker holds the same number of
rows, so every worker yields the same number of batches and no collective waits for a worker that has run
out: the training loop relies on it instead of agreeing on every micro-batch (``train.steps.counted``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dpo_ray.data.collate import collate_groups, collate_pairs, collate_sft
from dpo_ray.errors import BadRowError, DataError

SHUFFLE_POOL_BATCHES = 16  # without bucketing: the local shuffle buffer, in batches
AUTO_MIN_SAVING = 0.10  # length_bucketing auto: bucket a pool when it saves this share of its padded tokens


def padded_tokens(lens: np.ndarray, batches: list[np.ndarray]) -> int:
    """Tokens the collated batches hold, padding included (each batch padded to its longest row)."""
    return int(sum(int(lens[b].max()) * len(b) for b in batches if len(b)))


def unwrap_data_error(exc: BaseException) -> DataError | None:
    """The DataError (a bad row, too many dropped rows, an unreadable file) inside a Ray task or Train error
    (RayTaskError / UserCodeException / worker-group chains), if any, as a plain exception of its own type."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        # Ray Data appends its retry advice to the message on new lines: data error messages are one line
        if isinstance(e, BadRowError):
            return BadRowError(str(e.args[0]).split("\n")[0], e.kind, e.row_id)
        if isinstance(e, DataError) and type(e).__module__ == DataError.__module__:  # not Ray's dual class
            return type(e)(str(e.args[0]).split("\n")[0] if e.args else "")
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        failures = getattr(e, "worker_failures", None)  # Ray Train V2's WorkerGroupError: rank -> exception
        if isinstance(failures, dict):
            todo += list(failures.values())
    text = str(exc)
    if "bad row [" in text:  # the cause could not be deserialised: keep the message
        start = text.index("bad row [")
        return BadRowError(text[start:].split("\n")[0])
    return None


class BatchIterator:
    """Iterable of collated batches. ``padding_fraction`` = pad tokens / all tokens in what was yielded."""

    def __init__(self, shard, *, batch_size: int, pad_token_id: int, pad_to_multiple_of: int | None,
                 bucketing: bool, bucket_multiplier: int, seed: int, epoch: int, shuffle: bool, mode: str):
        self.shard, self.batch_size, self.pad_id = shard, batch_size, pad_token_id
        self.pad_to_multiple_of, self.bucketing, self.shuffle = pad_to_multiple_of, bucketing, shuffle
        self.pool_batches = bucket_multiplier if bucketing else SHUFFLE_POOL_BATCHES
        self.pools_bucketed = self.pools = 0  # with bucketing auto: how many pools were bucketed
        self.rng = np.random.default_rng([seed, epoch])
        self.collate = collate_sft if mode == "sft" else collate_pairs
        self.key = "chosen_input_ids"
        self.pad_tokens = 0
        self.total_tokens = 0
        self.batches = 0

    @property
    def padding_fraction(self) -> float:
        return self.pad_tokens / self.total_tokens if self.total_tokens else 0.0

    def _lengths(self, cols: dict[str, Any]) -> np.ndarray:
        if "group_input_ids" in cols:  # prompt groups: the packed row's length, prompt once
            return np.fromiter((int(np.sum(n)) - (len(n) - 1) * int(np.min(p)) for n, p in
                                zip(cols["group_lens"], cols["group_prompt_len"])), dtype=np.int64,
                               count=len(cols["row_id"]))
        lens = np.fromiter((len(x) for x in cols[self.key]), dtype=np.int64, count=len(cols["row_id"]))
        if "rejected_input_ids" in cols:
            lens = np.maximum(lens, np.fromiter((len(x) for x in cols["rejected_input_ids"]), dtype=np.int64,
                                                count=len(lens)))
        return lens

    def _pool_order(self, cols: dict[str, Any]) -> list[np.ndarray]:
        """Row indices of each full batch of this pool, in yield order."""
        n = len(cols["row_id"])
        order = self.rng.permutation(n) if self.shuffle else np.arange(n)
        full = n - n % self.batch_size
        cut = lambda o: [o[i:i + self.batch_size] for i in range(0, full, self.batch_size)]  # noqa: E731
        bucket = bool(self.bucketing)
        if bucket:
            lens = self._lengths(cols)
            by_length = order[np.argsort(lens[order], kind="stable")]
            if self.bucketing == "auto":  # only where it pays: the pool's own lengths decide
                plain, bucketed = padded_tokens(lens, cut(order)), padded_tokens(lens, cut(by_length))
                bucket = plain > 0 and (plain - bucketed) >= AUTO_MIN_SAVING * plain
            if bucket:
                order = by_length
        self.pools += 1
        self.pools_bucketed += bucket
        batches = cut(order)
        if bucket and self.shuffle:
            batches = [batches[i] for i in self.rng.permutation(len(batches))]
        return batches

    def _emit(self, cols: dict[str, Any], idx: np.ndarray) -> dict[str, torch.Tensor]:
        sub = {k: [v[i] for i in idx] if isinstance(v, list) else v[idx] for k, v in cols.items()}
        # prompt groups: by their columns
        collate = collate_groups if "group_input_ids" in sub else self.collate
        batch = collate(sub, self.pad_id, self.pad_to_multiple_of)
        mask = batch["attention_mask"]
        self.total_tokens += mask.numel()
        self.pad_tokens += mask.numel() - int(mask.sum())
        self.batches += 1
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        pool_rows = self.pool_batches * self.batch_size
        carry: dict[str, Any] | None = None
        try:
            for cols in self.shard.iter_batches(batch_size=pool_rows, batch_format="numpy",
                                                prefetch_batches=1):
                cols = dict(cols)
                if carry is not None:  # rows left over from a short pool join the next one
                    cols = {k: np.concatenate([carry[k], cols[k]]) for k in cols}
                    carry = None
                n = len(cols["row_id"])
                rest = n % self.batch_size
                if n < pool_rows and rest:
                    carry = cols  # a short pool mid-stream (block edge): wait for more rows
                    continue
                if rest:  # a long pool (a carry joined it): its last rows wait for the next one, none dropped
                    carry = {k: v[n - rest:] for k, v in cols.items()}
                    cols = {k: v[:n - rest] for k, v in cols.items()}
                for idx in self._pool_order(cols):
                    yield self._emit(cols, idx)
            if carry is not None:
                for idx in self._pool_order(carry):
                    yield self._emit(carry, idx)
        except Exception as e:
            bad = unwrap_data_error(e)
            if bad is not None:
                raise bad from None
            raise


class EvalShare(BatchIterator):
    """This worker's share of the whole eval stream (not split by Ray: every worker reads it all, in order):
    the rows at positions ``rank, rank + world, ...``, in order, in batches of ``batch_size``, the last one
    partial. Every row is in exactly one worker's share. ``filler``: a one-row batch of the stream's first
    row, which a worker whose share ran out scores with weight 0 while the others still run collective
    forwards."""

    def __init__(self, shard, *, rank: int, world: int, **kw):
        super().__init__(shard, **kw)
        self.rank, self.world = rank, world
        self.filler: dict[str, torch.Tensor] | None = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        pos, held = 0, None
        try:
            for cols in self.shard.iter_batches(batch_size=self.batch_size * self.world, batch_format="numpy",
                                                prefetch_batches=1):
                cols = dict(cols)
                n = len(cols["row_id"])
                if self.filler is None and n:
                    self.filler = self._emit(cols, np.array([0]))
                mine = np.nonzero((pos + np.arange(n)) % self.world == self.rank)[0]
                pos += n
                mine_cols = {k: [v[i] for i in mine] if isinstance(v, list) else v[mine]
                             for k, v in cols.items()}
                held = mine_cols if held is None else {k: np.concatenate([held[k], mine_cols[k]])
                                                       for k in held}
                while len(held["row_id"]) >= self.batch_size:
                    yield self._emit(held, np.arange(self.batch_size))
                    held = {k: v[self.batch_size:] for k, v in held.items()}
            if held is not None and len(held["row_id"]):
                yield self._emit(held, np.arange(len(held["row_id"])))  # the partial last batch counts too
        except Exception as e:
            bad = unwrap_data_error(e)
            if bad is not None:
                raise bad from None
            raise


def iter_eval_batches(shard, cfg, pad_token_id: int, *, batch_size: int, rank: int, world: int,
                      mode: str = "dpo") -> EvalShare:
    """This worker's eval batches (``EvalShare``): every eval row scored by exactly one worker."""
    return EvalShare(shard, rank=rank, world=world, batch_size=batch_size, pad_token_id=pad_token_id,
                     pad_to_multiple_of=cfg.pad_to_multiple_of, bucketing=False, bucket_multiplier=1, seed=0,
                     epoch=0, shuffle=False, mode=mode)


def iter_train_batches(shard, cfg, pad_token_id: int, *, batch_size: int, epoch: int, seed: int,
                       mode: str = "dpo", shuffle: bool = True) -> BatchIterator:
    """Collated batches from a Ray ``DataIterator`` shard (or a ``ray.data.Dataset``).

    Deterministic for the same (seed, epoch) and shard contents; ``cfg.length_bucketing`` pools
    ``cfg.bucket_size_multiplier × batch_size`` rows and batches them by length. The last partial batch
    is dropped (see the module docstring). Read ``.padding_fraction`` on the returned iterator.
    """
    return BatchIterator(shard, batch_size=batch_size, pad_token_id=pad_token_id,
                         pad_to_multiple_of=cfg.pad_to_multiple_of, bucketing=cfg.length_bucketing,
                         bucket_multiplier=cfg.bucket_size_multiplier, seed=seed, epoch=epoch,
                         shuffle=shuffle, mode=mode)
