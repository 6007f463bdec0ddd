"""The shard format: what is written is what is read, and a damaged shard is a one-line error."""

import os

import numpy as np
import pytest

from data.shards import HEADER_SIZE, Shard, ShardWriter, SplitWriter, open_shards, token_dtype, write_meta
from errors import NanozhError


def write(path, kind, examples, vocab_size=1000):
    with ShardWriter(path, kind, vocab_size) as w:
        for ex in examples:
            w.add(*ex)
    return path


def test_pretrain_round_trip(tmp_path):
    docs = [[5, 6, 7, 2], [8, 2], [999, 0, 2]]
    s = Shard(write(tmp_path / "a.bin", "pretrain", [(d,) for d in docs]))
    assert (s.kind, s.n_tokens, s.n_examples, s.tokens.dtype) == ("pretrain", 9, 3, np.uint16)
    assert s.tokens.tolist() == sum(docs, [])


def test_sft_round_trip(tmp_path):
    convs = [([4, 10, 11, 5], [0, 0, 1, 1]), ([4, 12, 5, 13, 14, 5, 15], [0, 0, 0, 0, 1, 1, 0])]
    s = Shard(write(tmp_path / "a.bin", "sft", convs))
    assert (s.kind, s.n_tokens, s.n_examples) == ("sft", 11, 2)
    for i, (ids, mask) in enumerate(convs):
        a, b = s.offsets[i], s.offsets[i + 1]
        assert s.tokens[a:b].tolist() == ids and s.mask[a:b].tolist() == mask


def test_dpo_round_trip(tmp_path):
    triples = [([4, 10, 11], [20, 5], [30, 31, 5]), ([4, 12], [21, 22, 23, 5], [5])]
    s = Shard(write(tmp_path / "a.bin", "dpo", triples))
    assert (s.kind, s.n_tokens, s.n_examples) == ("dpo", 15, 2)
    for (off, p, c, r), (prompt, chosen, rejected) in zip(s.index.tolist(), triples):
        assert s.tokens[off:off + p].tolist() == prompt
        assert s.tokens[off + p:off + p + c].tolist() == chosen
        assert s.tokens[off + p + c:off + p + c + r].tolist() == rejected


def test_large_vocab_uses_uint32(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    s = Shard(write(tmp_path / "a.bin", "pretrain", [([70000, 2],)], vocab_size=80000))
    assert s.tokens.dtype == np.uint32 and s.tokens.tolist() == [70000, 2]


def test_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "a.bin", "pretrain", 1000) as w:
            w.add([1, 2, 3])
            raise RuntimeError("worker died")
    assert os.listdir(tmp_path) == []


def test_wrong_magic_is_one_line_error(tmp_path):
    path = write(tmp_path / "a.bin", "pretrain", [([1, 2, 3],)])
    data = bytearray(path.read_bytes())
    data[:8] = b"GPT2BIN!"
    path.write_bytes(bytes(data))
    with pytest.raises(NanozhError) as e:
        Shard(path)
    assert str(e.value) == f"nanozh: {path}: not a nanozh shard (magic b'GPT2BIN!') (re-run data/prepare.py to rewrite it)"


def test_truncated_shard_is_one_line_error(tmp_path):
    path = write(tmp_path / "a.bin", "sft", [([4, 10, 11, 5], [0, 0, 1, 1])])
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 3)
    with pytest.raises(NanozhError) as e:
        Shard(path)
    assert str(e.value) == (f"nanozh: {path}: truncated shard: {size - 3} bytes, its header says {size} "
                            "(re-run data/prepare.py to rewrite it)")


def test_corrupt_header_is_detected(tmp_path):
    path = write(tmp_path / "a.bin", "pretrain", [([1, 2, 3],)])
    data = bytearray(path.read_bytes())
    data[24] ^= 1  # n_tokens: a size that still looks plausible
    path.write_bytes(bytes(data))
    with pytest.raises(NanozhError, match="corrupt shard header"):
        Shard(path)
    (tmp_path / "short.bin").write_bytes(data[:HEADER_SIZE - 1])
    with pytest.raises(NanozhError, match="too short for a shard header"):
        Shard(tmp_path / "short.bin")


def test_split_writer_rolls_over_and_open_shards_reads_all(tmp_path):
    w = SplitWriter(tmp_path, "train", "pretrain", 1000, max_shard_tokens=4)
    docs = [[1, 2, 3, 2], [4, 5, 2], [6, 2], [7, 8, 9, 10, 11, 2]]
    for d in docs:
        w.add(d)
    entry = w.close()
    assert entry == {"files": ["train_00000.bin", "train_00001.bin", "train_00002.bin"], "tokens": 15, "examples": 4}
    write_meta(tmp_path, {"kind": "pretrain", "vocab_size": 1000, "splits": {"train": entry}})
    shards = open_shards(tmp_path, "train")
    assert np.concatenate([s.tokens for s in shards]).tolist() == sum(docs, [])


def test_open_shards_errors(tmp_path):
    with pytest.raises(NanozhError) as e:
        open_shards(tmp_path / "nope", "train")
    assert str(e.value) == f"nanozh: {tmp_path / 'nope'}: no such shard directory (write one with data/prepare.py --kind ... --out DIR)"
    write_meta(tmp_path, {"kind": "sft", "vocab_size": 1000, "splits": {"train": {"files": []}}})
    with pytest.raises(NanozhError) as e:
        open_shards(tmp_path, "train", "pretrain")
    assert str(e.value) == f"nanozh: {tmp_path}: holds sft shards, this needs pretrain shards (prepare one with data/prepare.py --kind pretrain)"
