"""Batches for the three training stages, each a pure function of where it is in training.

    loader.get_batch(step, micro_step, rank, world_size, grad_accum)

Every rank of every micro-step of every step reads one batch at a global position

    position = (step * grad_accum + micro_step) * world_size + rank

and that batch depends only on (seed, position): no iterator, no hidden state. Resuming at step N
therefore needs nothing but N, and 2 ranks x 1 micro-step see exactly the samples of 1 rank x 2
micro-steps. Batches are CPU int64 tensors; the trainer moves them to the device (pin them first
for an asynchronous copy).

- PretrainLoader: B random windows of block_size + 1 tokens -> (x, y), y = x shifted by one.
- SFTLoader: B whole conversations padded to the batch's longest -> (x, y), y = -1 wherever no loss
  is taken (padding, and every target that is not an assistant token).
- DPOLoader: B preference triples -> (x, y, answer_mask) with 2B rows: the B prompt+chosen
  sequences, then the B prompt+rejected ones.

SFT and DPO walk their examples epoch by epoch in a permutation seeded by (seed, epoch). Within
windows of BUCKET_BATCHES batches the examples are sorted by length before being cut into batches,
and the batches are then shuffled, so each batch holds examples of similar length and little of it
is padding, while the order stays a pure function of (seed, position).
"""

import math

import numpy as np
import torch

from data.shards import Shard, open_shards, read_meta
from errors import user_error

BUCKET_BATCHES = 50


def position(step: int, micro_step: int, rank: int, world_size: int, grad_accum: int) -> int:
    return (step * grad_accum + micro_step) * world_size + rank


def _rng(seed: int, pos: int) -> np.random.Generator:
    return np.random.default_rng([seed, pos])


class PretrainLoader:
    """Random windows from the concatenated token shards of one split. A window start is drawn
    uniformly over every start that fits in some shard, which samples each shard in proportion to
    its size; windows never cross a shard file's end."""

    def __init__(self, shard_dir: str, split: str, block_size: int, batch_size: int, seed: int = 0):
        self.shard_dir, self.split = shard_dir, split
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.meta = read_meta(shard_dir, "pretrain")
        self.shards = open_shards(shard_dir, split, "pretrain")
        starts = np.array([max(s.n_tokens - block_size, 0) for s in self.shards], dtype=np.int64)
        self.cum_starts = np.cumsum(starts)
        self.first_start = self.cum_starts - starts  # global index of each shard's first window

    def get_batch(self, step: int, micro_step: int = 0, rank: int = 0, world_size: int = 1,
                  grad_accum: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        if not len(self.cum_starts) or not self.cum_starts[-1]:
            raise user_error(self.shard_dir, f"the {self.split} split has no shard longer than "
                             f"block_size={self.block_size} tokens", "prepare more text or lower block_size")
        rng = _rng(self.seed, position(step, micro_step, rank, world_size, grad_accum))
        g = rng.integers(0, self.cum_starts[-1], size=self.batch_size)
        which = np.searchsorted(self.cum_starts, g, side="right")
        offsets = g - self.first_start[which]
        T = self.block_size
        xy = np.stack([self.shards[k].tokens[o:o + T + 1] for k, o in zip(which, offsets)]).astype(np.int64)
        return torch.from_numpy(xy[:, :-1]), torch.from_numpy(xy[:, 1:])

    def val_tokens(self, max_tokens: int) -> torch.Tensor:
        """The first max_tokens tokens of this loader's split (all of it if shorter) as one 1-D int64
        tensor: open the loader on "val" for a validation loss that scores the same text every time."""
        parts, left = [], max_tokens
        for shard in self.shards:
            parts.append(np.asarray(shard.tokens[:left], dtype=np.int64))
            left -= len(parts[-1])
            if left <= 0:
                break
        if not sum(len(p) for p in parts):
            raise user_error(self.shard_dir, f"the {self.split} split is empty",
                             "prepare more text or raise --val_fraction")
        return torch.from_numpy(np.concatenate(parts))


def _epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """(n_batches, batch_size) example ids for one epoch: permuted, length-bucketed, shuffled."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if len(order) < batch_size:  # a split smaller than one batch repeats its examples
        order = np.resize(order, batch_size)
    n_batches = len(order) // batch_size
    order = order[:n_batches * batch_size]  # the remainder is left out of this epoch only
    window = BUCKET_BATCHES * batch_size
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        order[start:start + window] = chunk[np.argsort(lengths[chunk], kind="stable")]
    return order.reshape(n_batches, batch_size)[rng.permutation(n_batches)]


class _ExampleLoader:
    """What SFTLoader and DPOLoader share: a table of every example across the split's shards
    (shard, row) with its length, and the epoch-by-epoch batch order over it."""

    kind = ""
    what = ""      # what one example is called in the log
    cut_note = ""  # what happens to an example longer than max_len

    @classmethod
    def splits(cls, shard_dir: str, batch_size: int, seed: int, max_len: int) -> tuple["_ExampleLoader", "_ExampleLoader | None"]:
        """The train loader and the val loader of a shard directory (None when the val split is empty)."""
        has_val = read_meta(shard_dir, cls.kind)["splits"]["val"]["examples"] > 0
        val = cls(shard_dir, "val", batch_size, seed, max_len) if has_val else None
        return cls(shard_dir, "train", batch_size, seed, max_len), val

    def describe(self, max_steps: int, grad_accum: int, world_size: int) -> list[str]:
        """Lines for the training log: the split's size, the epochs max_steps makes, the cut examples."""
        epochs = self.epochs_at(max_steps, grad_accum, world_size)
        lines = [f"{len(self.lengths):,} train {self.what}, {max_steps} steps = {epochs:.2f} epochs"]
        n_cut = int((self.lengths > self.max_len + 1).sum())
        if n_cut:
            lines.append(f"{n_cut:,} {self.what} are longer than block_size {self.max_len} and are cut there: "
                         f"{self.cut_note} (prepare with --max_len {self.max_len} to avoid it)")
        return lines

    def __init__(self, shard_dir: str, split: str, batch_size: int, seed: int, max_len: int):
        self.batch_size, self.seed, self.max_len = batch_size, seed, max_len
        self.meta = read_meta(shard_dir, self.kind)
        self.pad_id = self.meta["pad_id"]
        self.shards = open_shards(shard_dir, split, self.kind)
        rows = [(k, i) for k, s in enumerate(self.shards) for i in range(s.n_examples)]
        if not rows:
            raise user_error(shard_dir, f"the {split} split has no examples", "prepare more data")
        self.examples = np.array(rows, dtype=np.int64)
        self.lengths = np.concatenate([self._lengths(s) for s in self.shards])
        self.n_batches = max(1, len(rows) // batch_size)
        self._cache: tuple[int, np.ndarray] | None = None
        self.last_padding_fraction = 0.0

    def epochs_at(self, step: int, grad_accum: int, world_size: int) -> float:
        """Passes over the split that `step` optimizer steps make."""
        return step * grad_accum * world_size / self.n_batches

    def steps_for(self, epochs: float, grad_accum: int, world_size: int) -> int:
        """Optimizer steps that `epochs` passes over the split take (SFT's and DPO's default max_steps)."""
        return max(1, math.ceil(epochs * self.n_batches / (grad_accum * world_size)))

    def example_ids(self, step: int, micro_step: int = 0, rank: int = 0, world_size: int = 1,
                    grad_accum: int = 1) -> np.ndarray:
        """(B,) indices into self.examples (and self.lengths) of the batch at this position."""
        epoch, b = divmod(position(step, micro_step, rank, world_size, grad_accum), self.n_batches)
        if self._cache is None or self._cache[0] != epoch:  # a cache of a pure function: same answer
            self._cache = (epoch, _epoch_batches(self.lengths, self.batch_size, self.seed, epoch))
        return self._cache[1][b]

    def _batch_ids(self, pos: int) -> np.ndarray:
        """(B, 2) shard and row of each example of the batch at global position pos."""
        return self.examples[self.example_ids(pos)]


class SFTLoader(_ExampleLoader):
    """Whole conversations, padded to the batch's longest (at most max_len positions; longer ones
    are cut). Position t of x predicts token t+1, so y[t] carries loss iff token t+1 is an
    assistant token (its content or its <|im_end|>); y = -1 everywhere else and on padding."""

    kind, what = "sft", "conversations"
    cut_note = "what is cut carries no loss (prepare cuts at a turn boundary instead)"

    def _lengths(self, shard: Shard) -> np.ndarray:
        return np.diff(shard.offsets)

    def get_batch(self, step: int, micro_step: int = 0, rank: int = 0, world_size: int = 1,
                  grad_accum: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for k, i in self._batch_ids(position(step, micro_step, rank, world_size, grad_accum)):
            s = self.shards[k]
            a, b = s.offsets[i], min(s.offsets[i + 1], s.offsets[i] + self.max_len + 1)
            rows.append((s.tokens[a:b].astype(np.int64), s.mask[a:b]))
        T = max(1, max(len(ids) for ids, _ in rows) - 1)
        x = np.full((len(rows), T), self.pad_id, dtype=np.int64)
        y = np.full((len(rows), T), -1, dtype=np.int64)
        for r, (ids, mask) in enumerate(rows):
            n = len(ids) - 1
            x[r, :n] = ids[:-1]
            y[r, :n] = np.where(mask[1:] == 1, ids[1:], -1)
        self.last_padding_fraction = 1 - sum(len(ids) - 1 for ids, _ in rows) / x.size
        return torch.from_numpy(x), torch.from_numpy(y)


class DPOLoader(_ExampleLoader):
    """Preference triples as one concatenated batch: rows 0..B-1 are prompt+chosen, rows B..2B-1
    prompt+rejected (each cut to max_len positions). answer_mask[r, t] is True where y[r, t] is an
    answer token (the answer and its <|im_end|>), so a sequence's summed response log-prob is
    (logp(y) * answer_mask).sum(-1)."""

    kind, what = "dpo", "pairs"
    cut_note = "only the answer tokens that fit are scored (prepare drops such pairs instead)"

    def _lengths(self, shard: Shard) -> np.ndarray:
        return shard.index[:, 1] + np.maximum(shard.index[:, 2], shard.index[:, 3])

    def get_batch(self, step: int, micro_step: int = 0, rank: int = 0, world_size: int = 1,
                  grad_accum: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen, rejected = [], []
        for k, i in self._batch_ids(position(step, micro_step, rank, world_size, grad_accum)):
            s = self.shards[k]
            off, p, c, r = (int(v) for v in s.index[i])
            prompt = s.tokens[off:off + p]
            chosen.append((np.concatenate([prompt, s.tokens[off + p:off + p + c]]), p))
            rejected.append((np.concatenate([prompt, s.tokens[off + p + c:off + p + c + r]]), p))
        rows = [(ids[:self.max_len + 1].astype(np.int64), p) for ids, p in chosen + rejected]
        T = max(1, max(len(ids) for ids, _ in rows) - 1)
        x = np.full((len(rows), T), self.pad_id, dtype=np.int64)
        y = np.full((len(rows), T), -1, dtype=np.int64)
        answer_mask = np.zeros((len(rows), T), dtype=bool)
        for j, (ids, p) in enumerate(rows):
            n = len(ids) - 1
            x[j, :n] = ids[:-1]
            y[j, :n] = ids[1:]
            answer_mask[j, max(p - 1, 0):n] = True  # the targets ids[p:], the answer tokens
        self.last_padding_fraction = 1 - sum(len(ids) - 1 for ids, _ in rows) / x.size
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(answer_mask)
