"""Loaders: every batch is a pure function of (seed, position), and targets carry loss exactly
where they should."""

import numpy as np
import pytest
import torch

from data.loaders import DPOLoader, PretrainLoader, SFTLoader, position
from data.shards import SplitWriter, write_meta
from errors import NanozhError

PAD = 3


def make_dir(path, kind, train, val=(), vocab_size=1000, max_shard_tokens=10**8):
    splits = {}
    for split, examples in (("train", train), ("val", val)):
        w = SplitWriter(path, split, kind, vocab_size, max_shard_tokens)
        for ex in examples:
            w.add(*ex)
        splits[split] = w.close()
    write_meta(path, {"kind": kind, "vocab_size": vocab_size, "pad_id": PAD, "eos_id": 2, "splits": splits})
    return str(path)


@pytest.fixture
def pretrain_dir(tmp_path):
    rng = np.random.default_rng(0)
    docs = [(list(rng.integers(6, 1000, size=int(n))) + [2],) for n in rng.integers(5, 60, size=40)]
    return make_dir(tmp_path, "pretrain", docs, val=docs[:3], max_shard_tokens=300)


def test_pretrain_batch_is_pure_function_of_position(pretrain_dir):
    a = PretrainLoader(pretrain_dir, "train", block_size=16, batch_size=4, seed=1)
    b = PretrainLoader(pretrain_dir, "train", block_size=16, batch_size=4, seed=1)
    x, y = a.get_batch(7, 1, 0, 2, 2)
    a.get_batch(3)  # other calls in between change nothing
    assert all(torch.equal(u, v) for u, v in zip((x, y), b.get_batch(7, 1, 0, 2, 2)))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert not torch.equal(x, a.get_batch(7, 1, 1, 2, 2)[0])  # other rank
    assert not torch.equal(x, a.get_batch(8, 1, 0, 2, 2)[0])  # other step
    assert not torch.equal(x, PretrainLoader(pretrain_dir, "train", 16, 4, seed=2).get_batch(7, 1, 0, 2, 2)[0])


def test_two_ranks_one_micro_step_equal_one_rank_two_micro_steps(pretrain_dir):
    loader = PretrainLoader(pretrain_dir, "train", block_size=8, batch_size=2, seed=0)
    for step in range(3):
        ranks = [loader.get_batch(step, 0, rank, 2, 1)[0] for rank in range(2)]
        micros = [loader.get_batch(step, micro, 0, 1, 2)[0] for micro in range(2)]
        assert all(torch.equal(r, m) for r, m in zip(ranks, micros))


def test_positions_follow_the_contract_and_never_repeat():
    # DEVELOPERS.md: (step * grad_accum + micro_step) * world_size + rank
    assert position(step=2, micro_step=1, rank=3, world_size=4, grad_accum=3) == 31
    seen = [position(s, m, r, 4, 3) for s in range(5) for m in range(3) for r in range(4)]
    assert sorted(seen) == list(range(60))


def test_pretrain_windows_are_contiguous_text_with_shifted_targets(pretrain_dir):
    loader = PretrainLoader(pretrain_dir, "train", block_size=16, batch_size=8, seed=0)
    stream = np.concatenate([s.tokens for s in loader.shards]).tolist()
    assert len(loader.shards) > 1  # windows are drawn from several files
    for step in range(5):
        x, y = loader.get_batch(step)
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in torch.cat([x, y[:, -1:]], 1).tolist():
            assert any(stream[i:i + 17] == row for i in range(len(stream) - 16))


def test_val_tokens_are_the_start_of_the_split(pretrain_dir):
    loader = PretrainLoader(pretrain_dir, "val", block_size=16, batch_size=4)
    val = np.concatenate([s.tokens for s in loader.shards]).tolist()
    assert loader.val_tokens(20).tolist() == val[:20]
    assert loader.val_tokens(10**6).tolist() == val


def test_pretrain_block_longer_than_data_is_an_error(pretrain_dir):
    loader = PretrainLoader(pretrain_dir, "train", block_size=100000, batch_size=4)
    with pytest.raises(NanozhError) as e:
        loader.get_batch(0)
    assert str(e.value) == (f"nanozh: {pretrain_dir}: the train split has no shard longer than block_size=100000 "
                            "tokens (prepare more text or lower block_size)")


def conversation(rng, n_turns):
    ids, mask = [], []
    for _ in range(n_turns):
        user, answer = rng.integers(6, 1000, size=int(rng.integers(1, 8))), rng.integers(6, 1000, size=int(rng.integers(1, 8)))
        ids += [4, 100, *user, 5, 4, 101, *answer, 5]
        mask += [0] * (len(user) + 5) + [1] * (len(answer) + 1)
    return ids, mask


@pytest.fixture
def sft_data(tmp_path):
    rng = np.random.default_rng(0)
    convs = [conversation(rng, int(rng.integers(1, 4))) for _ in range(30)]
    return make_dir(tmp_path, "sft", convs, max_shard_tokens=200), convs


def test_sft_targets_are_next_assistant_tokens_and_minus_one_elsewhere(sft_data):
    shard_dir, convs = sft_data
    loader = SFTLoader(shard_dir, "train", batch_size=4, seed=0, max_len=64)
    by_prefix = {tuple(ids[:-1]): (ids, mask) for ids, mask in convs}
    for step in range(10):
        x, y = loader.get_batch(step)
        for xr, yr in zip(x.tolist(), y.tolist()):
            n = max(i + 1 for i, v in enumerate(xr) if v != PAD)  # pad is never a real token here
            ids, mask = by_prefix[tuple(xr[:n])]
            expected = [t if m else -1 for t, m in zip(ids[1:], mask[1:])] + [-1] * (len(xr) - n)
            assert yr == expected
        assert loader.last_padding_fraction == pytest.approx((x == PAD).double().mean().item())


def test_sft_epoch_visits_every_example_once_and_is_pure(sft_data):
    shard_dir, convs = sft_data
    loader = SFTLoader(shard_dir, "train", batch_size=5, seed=3, max_len=64)
    seen = sorted(tuple(row) for step in range(6) for row in loader.get_batch(step)[0].tolist())
    assert len(seen) == 30 and len(set(seen)) == 30
    again = SFTLoader(shard_dir, "train", batch_size=5, seed=3, max_len=64)
    assert torch.equal(again.get_batch(4, 0, 1, 2, 1)[1], loader.get_batch(4, 0, 1, 2, 1)[1])
    assert sorted(np.concatenate([loader.example_ids(step) for step in range(6)]).tolist()) == list(range(30))
    epochs = [[loader.get_batch(step)[0][:, :4] for step in range(e * 6, e * 6 + 6)] for e in range(2)]
    assert not all(torch.equal(a, b) for a, b in zip(*epochs))  # the next epoch has another order


def test_sft_long_examples_are_cut_to_max_len(sft_data):
    x, y = SFTLoader(sft_data[0], "train", batch_size=8, seed=0, max_len=10).get_batch(0)
    assert x.shape == (8, 10)


def test_dpo_batch_layout_and_answer_mask(tmp_path):
    triples = [([4, 10, 11, 5, 4, 12], [20, 21, 5], [30, 5]), ([4, 13, 5, 4, 12], [22, 5], [31, 32, 33, 34, 5])]
    loader = DPOLoader(make_dir(tmp_path, "dpo", triples), "train", batch_size=2, seed=0, max_len=64)
    x, y, mask = loader.get_batch(0)
    assert x.shape == y.shape == mask.shape == (4, 9) and mask.dtype == torch.bool
    order = [0, 1] if x[0, 1] == 10 else [1, 0]
    rows = [triples[i][0] + triples[i][1] for i in order] + [triples[i][0] + triples[i][2] for i in order]
    for r, seq in enumerate(rows):
        n = len(seq) - 1
        assert x[r, :n].tolist() == seq[:-1] and (x[r, n:] == PAD).all()
        assert y[r, :n].tolist() == seq[1:] and (y[r, n:] == -1).all()
        answer = (triples[order[r % 2]][1] if r < 2 else triples[order[r % 2]][2])
        assert y[r][mask[r]].tolist() == answer  # exactly the answer tokens and their im_end
