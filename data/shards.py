"""Token shards: the one binary format nanozh trains from, written once and read with np.memmap.

A shard file (little-endian throughout):

    offset  size  field
         0     8  magic        b"NANOZHSH"
         8     4  version      uint32, currently 1
        12     4  kind         uint32: 0 pretrain, 1 sft, 2 dpo
        16     4  itemsize     uint32: bytes per token, 2 (uint16, vocab_size <= 65536) or 4 (uint32)
        20     4  vocab_size   uint32
        24     8  n_tokens     uint64
        32     8  n_examples   uint64: documents (pretrain), conversations (sft), triples (dpo)
        40    20  reserved     zeros
        60     4  header_crc   uint32, zlib.crc32 of bytes 0..59
        64        tokens       n_tokens x uint16/uint32
                  then each further section starts at the next multiple of 8 bytes:
                  sft:  mask     n_tokens x uint8, 1 where the token is an assistant token
                        offsets  (n_examples + 1) x int64, example i is tokens[offsets[i]:offsets[i+1]]
                  dpo:  index    (n_examples, 4) x int64: offset, prompt_len, chosen_len, rejected_len;
                                 the example's tokens are prompt, chosen, rejected back to back

Pretraining documents are stored back to back, each followed by </s> (eos), so the file is one
stream a loader cuts windows from. Nothing follows the last section: a file of any other size is
truncated or corrupt, and reading it is an error naming the file.

A shard directory (written by data/prepare.py) holds train_00000.bin, train_00001.bin, ...,
val_00000.bin, ..., meta.json (kind, counts per split, the tokenizer's sha256, vocab size and
special ids, the prepare arguments and cleaning stats) and tokenizer.model, a copy of the tokenizer
that made it. A split is cut into files of at most ~100M tokens so no single file gets unwieldy.

Writing streams: tokens go straight to disk as they come, the mask and index to side files that
are appended at close, and the header is written last, so memory stays flat however large the
shard. The file is written as NAME.tmp and renamed into place only when complete.
"""

import json
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

from errors import user_error
from files import write_text_atomic

MAGIC = b"NANOZHSH"
VERSION = 1
KINDS = ("pretrain", "sft", "dpo")
HEADER = struct.Struct("<8sIIIIQQ20x")  # everything but the trailing crc
HEADER_SIZE = HEADER.size + 4  # 64
MAX_SHARD_TOKENS = 100_000_000


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _align8(n: int) -> int:
    return (n + 7) // 8 * 8


def _layout(kind: str, itemsize: int, n_tokens: int, n_examples: int) -> dict[str, tuple[int, int]]:
    """Byte (start, end) of each section of a shard, from the header's numbers alone."""
    sections = {"tokens": (HEADER_SIZE, HEADER_SIZE + n_tokens * itemsize)}
    end = sections["tokens"][1]
    if kind == "sft":
        sections["mask"] = (_align8(end), _align8(end) + n_tokens)
        end = sections["mask"][1]
        sections["offsets"] = (_align8(end), _align8(end) + (n_examples + 1) * 8)
    elif kind == "dpo":
        sections["index"] = (_align8(end), _align8(end) + n_examples * 4 * 8)
    return sections


class ShardWriter:
    """Streams one shard to disk, one example per add():
        pretrain  add(ids)                       a document, its eos included (or n documents back
                                                 to back with examples=n)
        sft       add(ids, mask)                 a conversation and its assistant mask
        dpo       add(prompt, chosen, rejected)  the three token spans of a preference triple
    `close()` writes the header and renames the file into place; used as a context manager, an
    exception leaves no file behind."""

    def __init__(self, path: str | Path, kind: str, vocab_size: int):
        assert kind in KINDS, kind
        self.path, self.kind, self.vocab_size = Path(path), kind, vocab_size
        self.dtype = token_dtype(vocab_size)
        self.n_tokens = self.n_examples = 0
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._f = open(self._tmp, "wb")
        self._f.write(b"\0" * HEADER_SIZE)  # placeholder: the real header goes in last
        self._mask = tempfile.TemporaryFile(dir=self.path.parent) if kind == "sft" else None
        self._index = tempfile.TemporaryFile(dir=self.path.parent) if kind != "pretrain" else None
        if kind == "sft":
            self._index.write(np.zeros(1, np.int64).tobytes())

    def _tokens(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size}) for {self.path}")
        return ids.astype(self.dtype, copy=False)

    def add(self, *arrays, examples: int = 1) -> None:
        assert examples == 1 or self.kind == "pretrain", "only pretraining documents can come several at once"
        if self.kind == "pretrain":
            (ids,) = arrays
            self._f.write(self._tokens(ids).tobytes())
            n = len(ids)
        elif self.kind == "sft":
            ids, mask = arrays
            assert len(ids) == len(mask), "one mask value per token"
            self._f.write(self._tokens(ids).tobytes())
            self._mask.write(np.asarray(mask, np.uint8).tobytes())
            n = len(ids)
            self._index.write(np.array([self.n_tokens + n], np.int64).tobytes())
        else:
            prompt, chosen, rejected = arrays
            for part in (prompt, chosen, rejected):
                self._f.write(self._tokens(part).tobytes())
            n = len(prompt) + len(chosen) + len(rejected)
            row = [self.n_tokens, len(prompt), len(chosen), len(rejected)]
            self._index.write(np.array(row, np.int64).tobytes())
        self.n_tokens += n
        self.n_examples += examples

    def close(self) -> Path:
        """Append the side sections, write the header, and move the finished file into place."""
        sections = _layout(self.kind, self.dtype.itemsize, self.n_tokens, self.n_examples)
        for name, side in (("mask", self._mask), ("offsets", self._index), ("index", self._index)):
            if name in sections:
                self._f.write(b"\0" * (sections[name][0] - self._f.tell()))
                side.seek(0)
                shutil.copyfileobj(side, self._f)
        assert self._f.tell() == max(end for _, end in sections.values())
        head = HEADER.pack(MAGIC, VERSION, KINDS.index(self.kind), self.dtype.itemsize,
                           self.vocab_size, self.n_tokens, self.n_examples)
        self._f.seek(0)
        self._f.write(head + struct.pack("<I", zlib.crc32(head)))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._close_files()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._close_files()
        self._tmp.unlink(missing_ok=True)

    def _close_files(self) -> None:
        for f in (self._f, self._mask, self._index):
            if f is not None:
                f.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


class SplitWriter:
    """Writes one split of a shard directory as DIR/{split}_00000.bin, _00001.bin, ..., starting a
    new file once the current one holds max_shard_tokens (an add() never straddles two files)."""

    def __init__(self, out_dir: str | Path, split: str, kind: str, vocab_size: int,
                 max_shard_tokens: int = MAX_SHARD_TOKENS):
        self.out_dir, self.split, self.kind, self.vocab_size = Path(out_dir), split, kind, vocab_size
        self.max_shard_tokens = max_shard_tokens
        self.files: list[str] = []
        self.n_tokens = self.n_examples = 0
        self._writer: ShardWriter | None = None

    def add(self, *arrays, examples: int = 1) -> None:
        if self._writer is None:
            name = f"{self.split}_{len(self.files):05d}.bin"
            self._writer = ShardWriter(self.out_dir / name, self.kind, self.vocab_size)
            self.files.append(name)
        self._writer.add(*arrays, examples=examples)
        if self._writer.n_tokens >= self.max_shard_tokens:
            self._finish_file()

    def _finish_file(self) -> None:
        self.n_tokens += self._writer.n_tokens
        self.n_examples += self._writer.n_examples
        self._writer.close()
        self._writer = None

    def close(self) -> dict:
        """Finish the last file; returns this split's entry for meta.json."""
        if self._writer is not None:
            self._finish_file()
        return {"files": self.files, "tokens": self.n_tokens, "examples": self.n_examples}

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


class Shard:
    """One shard file opened read-only: `tokens` (memmap), and for sft `mask` + `offsets`, for dpo
    `index` (n_examples, 4). Every size is checked against the header before anything is mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw = f.read(HEADER_SIZE)
        except OSError as e:
            raise user_error(self.path, f"cannot read shard: {e.strerror}",
                             "re-run data/prepare.py to write the shard directory") from None
        rerun = "re-run data/prepare.py to rewrite it"
        if len(raw) < HEADER_SIZE or raw[:8] != MAGIC:
            what = "file too short for a shard header" if len(raw) < HEADER_SIZE else f"not a nanozh shard (magic {raw[:8]!r})"
            raise user_error(self.path, what, rerun)
        if struct.unpack("<I", raw[-4:])[0] != zlib.crc32(raw[:-4]):
            raise user_error(self.path, "corrupt shard header (checksum mismatch)", rerun)
        _, version, kind, itemsize, self.vocab_size, self.n_tokens, self.n_examples = HEADER.unpack(raw[:-4])
        if version != VERSION:
            raise user_error(self.path, f"shard format version {version}, this nanozh reads version {VERSION}", rerun)
        if kind >= len(KINDS) or itemsize not in (2, 4):
            raise user_error(self.path, f"corrupt shard header (kind {kind}, itemsize {itemsize})", rerun)
        self.kind, self.dtype = KINDS[kind], np.dtype(f"<u{itemsize}")
        sections = _layout(self.kind, itemsize, self.n_tokens, self.n_examples)
        expected = max(end for _, end in sections.values())
        if size != expected:
            what = "truncated shard" if size < expected else "shard has trailing bytes"
            raise user_error(self.path, f"{what}: {size} bytes, its header says {expected}", rerun)
        buf = np.memmap(self.path, dtype=np.uint8, mode="r")
        view = lambda name, dtype: buf[slice(*sections[name])].view(dtype)
        self.tokens = view("tokens", self.dtype)
        self.mask = view("mask", np.uint8) if self.kind == "sft" else None
        self.offsets = view("offsets", "<i8") if self.kind == "sft" else None
        self.index = view("index", "<i8").reshape(-1, 4) if self.kind == "dpo" else None

    def __repr__(self) -> str:
        return f"Shard({str(self.path)!r}, {self.kind}, {self.n_tokens:,} tokens, {self.n_examples:,} examples)"


def write_meta(out_dir: str | Path, meta: dict) -> None:
    write_text_atomic(Path(out_dir) / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def read_meta(shard_dir: str | Path, kind: str | None = None) -> dict:
    """meta.json of a shard directory; with `kind`, a directory of another kind is an error."""
    path = Path(shard_dir) / "meta.json"
    if not path.is_file():
        what = "not a shard directory (no meta.json)" if Path(shard_dir).is_dir() else "no such shard directory"
        raise user_error(shard_dir, what, "write one with data/prepare.py --kind ... --out DIR")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        missing = [key for key in ("kind", "vocab_size", "splits") if key not in meta]
    except ValueError as e:
        raise user_error(path, f"corrupt meta.json ({e})", "re-run data/prepare.py") from None
    if missing:
        raise user_error(path, f"meta.json lacks {', '.join(missing)}", "re-run data/prepare.py")
    if kind is not None and meta["kind"] != kind:
        raise user_error(shard_dir, f"holds {meta['kind']} shards, this needs {kind} shards",
                         f"prepare one with data/prepare.py --kind {kind}")
    return meta


def open_shards(shard_dir: str | Path, split: str, kind: str | None = None) -> list[Shard]:
    """Open every shard file of one split ("train" or "val"), checked against meta.json."""
    meta = read_meta(shard_dir, kind)
    if split not in meta["splits"]:
        raise user_error(shard_dir, f"no {split!r} split in meta.json (it has {sorted(meta['splits'])})",
                         "re-run data/prepare.py")
    shards = [Shard(Path(shard_dir) / name) for name in meta["splits"][split]["files"]]
    for s in shards:
        if s.kind != meta["kind"] or s.vocab_size != meta["vocab_size"]:
            raise user_error(s.path, f"{s.kind} shard with vocab {s.vocab_size} in a {meta['kind']} directory "
                             f"with vocab {meta['vocab_size']}", "re-run data/prepare.py")
    return shards
