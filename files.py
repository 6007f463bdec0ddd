"""Reading and writing files safely: the one atomic write and the one JSONL reader of nanozh.

A file nanozh writes is either the old one or the new one, never half of each: it is written to a
temp file beside its target and renamed over it (a rename within one directory is atomic on POSIX).
A JSONL file is read line by line into (line number, record), and a line that is not JSON is an
error naming the file and the line. (data/sources.py streams corpora of any size in parallel
blocks; it parses each line with parse_jsonl_line, so its errors read the same.) read_prompts is
the prompt-file format of sample.py and eval.py.
"""

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from errors import NanozhError, user_error


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """A temp path beside `path` for the block to write; renamed over `path` when the block ends,
    deleted if it raises. With fsync the data reaches the disk before the rename (checkpoints:
    after a power cut the new name must not point at an empty file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    # mkstemp makes the file private (0600); the file it replaces is an ordinary one that other
    # accounts (a vLLM or ollama service user) must be able to read: the umask decides, as for open()
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks (a model's weights can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """All lines or nothing, one JSON object per line, Chinese kept readable (no \\u escapes)."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def parse_jsonl_line(path: str | os.PathLike, line_no: int, line: str):
    """The JSON value on one line; a malformed line is a file:line error with the column."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise user_error(path, f"malformed JSON ({e.msg} at column {e.pos + 1})", "fix or remove the line",
                         line=line_no) from None


def read_jsonl(path: str | os.PathLike, skip_bad_last_line: bool = False) -> Iterator[tuple[int, object]]:
    """(line number, JSON value) for every non-blank line of a UTF-8 JSONL file. With
    skip_bad_last_line, a last line that does not parse is dropped instead of being an error: a log
    that a killed process was appending to ends in a line cut short."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise user_error(path, f"cannot read ({e})", "pass a UTF-8 JSONL file") from None
    last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = parse_jsonl_line(path, n, line)
        except NanozhError:
            if skip_bad_last_line and n == last:
                return
            raise
        yield n, record


def read_prompts(path: str) -> list[tuple[int, dict]]:
    """(line number, record) per prompt: JSONL records with a string "prompt" (other fields are
    kept), or for any other file each non-empty line as {"prompt": line}."""
    if path.endswith(".jsonl"):
        prompts = list(read_jsonl(path))
    else:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise user_error(path, f"cannot read prompt file ({e})", "pass a UTF-8 text or JSONL file") from None
        prompts = [(n, {"prompt": line}) for n, line in enumerate(lines, 1) if line.strip()]
    for n, rec in prompts:
        if not isinstance(rec, dict) or "prompt" not in rec:
            have = f"fields: {', '.join(rec) or 'none'}" if isinstance(rec, dict) else f"a JSON {type(rec).__name__}"
            raise user_error(path, f'no "prompt" field ({have})', 'write {"prompt": "..."} on each line', line=n)
        if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
            raise user_error(path, f'"prompt" is {rec["prompt"]!r}, not a non-empty string', "", line=n)
    if not prompts:
        raise user_error(path, "no prompts in file", "one prompt per line, or JSONL with a \"prompt\" field")
    return prompts
