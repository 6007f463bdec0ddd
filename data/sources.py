"""Streaming readers for every input format nanozh accepts, with one set of field conventions.

    iter_pretrain(paths) -> (where, text)
    iter_sft(paths)      -> (where, messages)              messages: [{"role", "content"}, ...]
    iter_dpo(paths)      -> (where, {"prompt": messages, "chosen": str, "rejected": str})

`where` is "<file>:<line or row>" (1-based) for error messages. A path may be a file or a directory
(its supported files, sorted, not recursive). Nothing is ever read whole:

    .txt  .txt.gz        plain text, documents separated by blank lines (pretraining only)
    .jsonl  .jsonl.gz    one JSON object per line
    .json  .json.gz      one JSON array of objects, decoded element by element from 1 MB chunks
                         (memory is bounded by the largest single element, not by the file)
    .parquet             pyarrow row batches (a Table of them per block)

Reading happens in two steps, so that data/prepare.py can spread the costly one over its workers:
read_blocks(paths, kind) cuts the files into Blocks of about BLOCK_BYTES (bytes of whole JSONL
lines, a pyarrow Table of row batches, or for .txt/.json records already split out), and
parse_block(block, kind) decodes one into (where, value) pairs. Bytes and Arrow buffers pickle as
plain copies, so the main process that reads stays cheap while JSON decoding and making Python
strings scale with the workers. The iter_* functions are the two steps in one process.

Field conventions (the first that matches wins):
    pretrain  `text`, else `content` (a bare JSON string is also a document)
    SFT       `messages` or `conversations`, turns {role, content} or {from, value}, roles
              user/assistant/system or human/gpt (an optional top-level `system` string is put
              first); `prompt` + `response`; `instruction` + optional `input` + `output`
              (the user turn is instruction + "\\n" + input when input is not empty)
    DPO       `prompt` (a string = one user turn, or a list of turns ending with a user turn) or
              `instruction` + `input`; `chosen` and `rejected` are strings, or a list of turns whose
              last is the assistant answer (or that one turn as an object)

A bad record (malformed JSON, missing field, unknown role, empty content, a conversation that does
not end with an assistant turn) is a NanozhError naming file and line. Pass `on_error` to get each
such error and skip the record instead (prepare.py counts them); problems with a whole file (missing,
not UTF-8, not a JSON array) always raise.
"""

import gzip
import json
import os
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from errors import NanozhError, user_error
from files import parse_jsonl_line

SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
OnError = Callable[[NanozhError], None] | None
BLOCK_BYTES = 1 << 20  # raw input per Block: big enough to amortise a hop between processes
JSON_RECORDS_PER_BLOCK = 256  # a .json array's elements are decoded on reading; ~1 KB each


def expand_paths(paths: list[str]) -> list[str]:
    """Files named by `paths`, directories replaced by their supported files in sorted order."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(SUFFIXES))
            if not found:
                raise user_error(p, "directory holds no input files", f"expected {', '.join(SUFFIXES)}")
            files += found
        elif not os.path.exists(p):
            raise user_error(p, "no such file or directory", "check the --input path")
        elif not p.endswith(SUFFIXES):
            raise user_error(p, "unsupported file type", f"use one of {', '.join(SUFFIXES)}")
        else:
            files.append(p)
    if not files:
        raise user_error("--input", "no input files given", "pass at least one file or directory")
    return files


# ----------------------------------------------------------------------------- raw records

def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def _txt_records(path: str) -> Iterator[tuple[int, str]]:
    """(line where the document starts, document) for blank-line separated documents."""
    with _open_text(path) as f:
        lines, start = [], 0
        for n, line in enumerate(f, 1):
            if line.strip():
                if not lines:
                    start = n
                lines.append(line)
            elif lines:
                yield start, "".join(lines).rstrip("\n")
                lines = []
        if lines:
            yield start, "".join(lines).rstrip("\n")


def _json_records(path: str, chunk_chars: int = 1 << 20) -> Iterator[tuple[int, object]]:
    """Elements of a top-level JSON array, decoded one at a time with raw_decode over a sliding
    buffer. An element cut by the chunk boundary fails to decode; we then read more and retry."""
    decoder = json.JSONDecoder()
    with _open_text(path) as f:
        buf, pos, line, eof = "", 0, 1, False

        def skip(chars: str) -> bool:  # advance over `chars`; False when the buffer ran out
            nonlocal buf, pos, line, eof
            while True:
                while pos < len(buf) and buf[pos] in chars:
                    line += buf[pos] == "\n"
                    pos += 1
                if pos < len(buf) or eof:
                    return pos < len(buf)
                buf, pos = f.read(chunk_chars), 0
                eof = not buf

        if not skip(" \t\r\n\ufeff") or buf[pos] != "[":
            raise user_error(path, "expected a JSON array of objects", "use .jsonl for one object per line", line=line)
        pos += 1
        first = True
        while True:
            if not skip(" \t\r\n"):
                raise user_error(path, "JSON array is not closed", "the file may be truncated", line=line)
            if buf[pos] == "]":
                return
            if not first:
                if buf[pos] != ",":
                    raise user_error(path, "malformed JSON (expected ',' between elements)", "fix the file", line=line)
                pos += 1
                if not skip(" \t\r\n"):
                    raise user_error(path, "JSON array is not closed", "the file may be truncated", line=line)
            first = False
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof:  # a number could continue in the next chunk
                        break
                except json.JSONDecodeError as e:
                    if eof:
                        raise user_error(path, f"malformed JSON ({e.msg})", "fix the file",
                                         line=line + buf.count("\n", pos, e.pos)) from None
                more = f.read(max(chunk_chars, len(buf)))  # doubling keeps a huge element linear
                eof = not more
                buf, pos = buf[pos:] + more, 0
            yield line, _lone_surrogate_error(path, line, obj, buf, pos, end) or obj
            line += buf.count("\n", pos, end)
            pos = end


def _lone_surrogate_error(path: str, line: int, value: object, raw: str, start: int = 0,
                          end: int | None = None) -> NanozhError | None:
    """The error for a JSON value holding half of a surrogate pair (an escape such as \\ud800 with
    no partner): valid JSON, but not Unicode, so no UTF-8 encoder takes it. Only a value whose raw
    text raw[start:end] has a \\ud escape (rare) is checked."""
    if raw.find("\\ud", start, end) < 0 and raw.find("\\uD", start, end) < 0:
        return None
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return user_error(path, "a lone surrogate escape (\\ud800-\\udfff) is not valid Unicode",
                          "fix or remove the record", line=line)
    return None


@dataclass
class Block:
    """Consecutive records of one file, read but not decoded (see the module docstring)."""
    path: str
    line: int     # the line (or Parquet row) of its first record, 1-based
    form: str     # "lines": bytes of whole JSONL lines; "arrow": a pyarrow Table;
    data: object  # "records": [(line, record), ...] already split out of a .txt or .json file


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _line_blocks(path: str) -> Iterator[Block]:
    """A JSONL file as blocks of whole lines, cut at the last newline of each read."""
    with _open_binary(path) as f:
        line, rest = 1, b""
        while data := f.read(BLOCK_BYTES):
            buf = rest + data
            cut = buf.rfind(b"\n") + 1  # 0 when one line is longer than a read: read on
            if cut:
                yield Block(path, line, "lines", buf[:cut])
                line += buf.count(b"\n", 0, cut)
            rest = buf[cut:]
        if rest:
            yield Block(path, line, "lines", rest)


def _parquet_blocks(path: str) -> Iterator[Block]:
    try:
        # pre_buffer (the default) would read a row group's whole compressed column into memory
        # before decoding it; streamed through a buffer of a block instead, the main process's peak
        # was 8-15 MB lower on the bundled corpus and on the full 97 MB pretraining set, and no slower
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=BLOCK_BYTES)
        # a page is read and decompressed whole, and one page can be large: pyarrow's writer puts a
        # column's first 1,024 values into its dictionary page before it gives up on a dictionary
        # for unique texts, so a file of long documents starts with a page of 1,024 of them (16 MB
        # of novels in one file we read). Until the row group is read through, pyarrow then holds
        # the page's values decoded and its buffer for decompressed pages, as large as the page:
        # that file takes the main process from ~65 to ~97 MB. (Reading the row group whole holds
        # the values once, but the page compressed, decompressed, decoded and copied out all at once
        # while it decodes: +64 MB, measured.)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise user_error(path, f"not a readable Parquet file ({e})", "check the file") from None
    meta = pf.metadata
    size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    # batches of ~1/8 block by the file's average row, gathered into blocks of BLOCK_BYTES: row
    # sizes vary along a file (a law code's first articles are long), and a worker's memory
    # follows the size of its block
    rows = max(1, min(65536, BLOCK_BYTES * meta.num_rows // max(size, 1) // 8))
    row, batches, n_bytes = 1, [], 0
    try:
        # one thread: pyarrow's pool would compete with the worker processes for the same cores
        for batch in pf.iter_batches(batch_size=rows, use_threads=False):
            batches.append(batch)
            n_bytes += batch.nbytes
            if n_bytes >= BLOCK_BYTES:
                table = pa.Table.from_batches(batches)  # no copy: the batches become its chunks
                yield Block(path, row, "arrow", table)
                row, batches, n_bytes = row + len(table), [], 0
    except (OSError, pa.ArrowException) as e:  # a damaged page: pyarrow finds it only on reading it
        raise user_error(path, f"damaged Parquet data in this row or a later one ({e})",
                         "re-download or rewrite the file", line=row + sum(map(len, batches))) from None
    if batches:
        yield Block(path, row, "arrow", pa.Table.from_batches(batches))


def _record_blocks(path: str, records: Iterator[tuple[int, object]]) -> Iterator[Block]:
    """Records split out in this process (.txt documents, .json elements), grouped into blocks."""
    group, size = [], 0
    for n, rec in records:
        group.append((n, rec))
        size += len(rec) * 3 if isinstance(rec, str) else BLOCK_BYTES // JSON_RECORDS_PER_BLOCK
        if size >= BLOCK_BYTES:
            yield Block(path, group[0][0], "records", group)
            group, size = [], 0
    if group:
        yield Block(path, group[0][0], "records", group)


def read_blocks(paths: list[str], kind: str) -> Iterator[Block]:
    """The files of `paths`, in order, as Blocks for parse_block(block, kind)."""
    for path in expand_paths(paths):
        try:
            if path.endswith((".txt", ".txt.gz")):
                if kind != "pretrain":
                    raise user_error(path, "plain text holds no conversations", "use .jsonl, .json or .parquet")
                yield from _record_blocks(path, _txt_records(path))
            elif path.endswith((".jsonl", ".jsonl.gz")):
                yield from _line_blocks(path)
            elif path.endswith((".json", ".json.gz")):
                yield from _record_blocks(path, _json_records(path))
            else:
                yield from _parquet_blocks(path)
        except UnicodeDecodeError as e:
            raise user_error(path, f"not valid UTF-8 (byte {e.start} of a read chunk)", "convert the file to UTF-8") from None
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise user_error(path, f"damaged gzip file ({e})", "re-download or recompress it") from None


def _block_records(block: Block, on_error: OnError) -> Iterator[tuple[int, object]]:
    """(line or row, record) for every record of a block; a record is a str or a decoded JSON value."""
    if block.form == "arrow":
        yield from enumerate(block.data.to_pylist(), block.line)
    elif block.form == "records":
        for n, rec in block.data:
            if isinstance(rec, NanozhError):  # found by _json_records, reported here like the others
                _fail(rec, on_error)
            else:
                yield n, rec
    else:
        try:
            text = block.data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise user_error(block.path, "not valid UTF-8", "convert the file to UTF-8",
                             line=block.line + block.data.count(b"\n", 0, e.start)) from None
        for n, line in enumerate(text.split("\n"), block.line):
            if not line.strip():
                continue
            try:
                rec = parse_jsonl_line(block.path, n, line)
            except NanozhError as e:
                _fail(e, on_error)
                continue
            if err := _lone_surrogate_error(block.path, n, rec, line):
                _fail(err, on_error)
            else:
                yield n, rec


def _fail(err: NanozhError, on_error: OnError) -> None:
    if on_error is None:
        raise err
    on_error(err)


def _arrow_text_column(table: pa.Table) -> list[str] | None:
    """A block's `text` column as Python strings when every row has one: what _pretrain_text
    would return row by row, without making a dict per row (to_pylist of the whole table takes
    ~1.6x as long). None when some row needs the row-by-row rules."""
    if "text" not in table.schema.names:
        return None
    column = table.column("text")
    if column.null_count or not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return None
    return column.to_pylist()


def parse_block(block: Block, kind: str, on_error: OnError = None) -> Iterator[tuple[str, object]]:
    """(where, value) for every good record of a block, parsed by the field conventions of `kind`;
    a ValueError from them becomes a NanozhError at the record's file:line."""
    if block.form == "arrow" and kind == "pretrain" and (texts := _arrow_text_column(block.data)) is not None:
        yield from ((f"{block.path}:{n}", text) for n, text in enumerate(texts, block.line))
        return
    parse = PARSERS[kind]
    for n, rec in _block_records(block, on_error):
        try:
            value = parse(rec)
        except ValueError as e:
            _fail(user_error(block.path, *e.args, line=n), on_error)
            continue
        yield f"{block.path}:{n}", value


# ----------------------------------------------------------------------------- field conventions
# parse functions raise ValueError(what, what to do); _stream adds the file and line.

def _fields(rec: object) -> str:
    return ", ".join(rec) if isinstance(rec, dict) and rec else "none"


def _string(rec: dict, key: str) -> str:
    value = rec[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"field '{key}' is empty or not a string", "give it non-empty text")
    return value


def _pretrain_text(rec: object) -> str:
    if isinstance(rec, str):
        return rec
    if isinstance(rec, dict):
        for key in ("text", "content"):
            if isinstance(rec.get(key), str):
                return rec[key]
    raise ValueError(f"no text field (fields: {_fields(rec)})", "pretraining reads 'text' or 'content'")


def _turns(turns: object, field: str) -> list[dict]:
    """Normalise a list of {role, content} / {from, value} turns to {role, content} dicts."""
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"field '{field}' is not a non-empty list of turns", "give a list of {role, content} objects")
    out = []
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i} of '{field}' is not an object", "give {role, content} objects")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} in turn {i}", "use user/assistant/system (or human/gpt)")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"empty content in turn {i}", "give every turn some text")
        out.append({"role": ROLES[role], "content": content})
    return out


def _sft_messages(rec: object) -> list[dict]:
    if not isinstance(rec, dict):
        raise ValueError("record is not a JSON object", "give one object per conversation")
    if "messages" in rec or "conversations" in rec:
        field = "messages" if "messages" in rec else "conversations"
        msgs = _turns(rec[field], field)
        if isinstance(rec.get("system"), str) and rec["system"].strip() and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": rec["system"]})
    elif "prompt" in rec and "response" in rec:
        msgs = [{"role": "user", "content": _string(rec, "prompt")},
                {"role": "assistant", "content": _string(rec, "response")}]
    elif "instruction" in rec and "output" in rec:
        msgs = [{"role": "user", "content": _instruction(rec)},
                {"role": "assistant", "content": _string(rec, "output")}]
    else:
        raise ValueError(f"no conversation fields (fields: {_fields(rec)})",
                         "SFT reads messages/conversations, prompt+response or instruction+output")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError("conversation has no assistant turn", "add the answer to learn from")
    if msgs[-1]["role"] != "assistant":
        raise ValueError(f"conversation ends with a {msgs[-1]['role']} turn", "end it with the assistant's answer")
    return msgs


def _instruction(rec: dict) -> str:
    text = _string(rec, "instruction")
    extra = rec.get("input")
    return text + "\n" + extra if isinstance(extra, str) and extra.strip() else text


def _answer(rec: dict, key: str) -> str:
    if key not in rec:
        raise ValueError(f"missing field '{key}' (fields: {_fields(rec)})", "DPO reads prompt, chosen and rejected")
    value = rec[key]
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        turns = _turns(value, key)
        if turns[-1]["role"] != "assistant":
            raise ValueError(f"the last turn of '{key}' is not the assistant's", "end it with the answer")
        return turns[-1]["content"]
    return _string(rec, key)


def _dpo_triple(rec: object) -> dict:
    if not isinstance(rec, dict):
        raise ValueError("record is not a JSON object", "give one object per triple")
    if "prompt" in rec:
        prompt = rec["prompt"]
        if isinstance(prompt, list):
            prompt = _turns(prompt, "prompt")
            if prompt[-1]["role"] != "user":
                raise ValueError("prompt does not end with a user turn", "end it with the question")
        else:
            prompt = [{"role": "user", "content": _string(rec, "prompt")}]
    elif "instruction" in rec:
        prompt = [{"role": "user", "content": _instruction(rec)}]
    else:
        raise ValueError(f"missing field 'prompt' (fields: {_fields(rec)})", "DPO reads prompt, chosen and rejected")
    return {"prompt": prompt, "chosen": _answer(rec, "chosen"), "rejected": _answer(rec, "rejected")}


# ----------------------------------------------------------------------------- public API

PARSERS = {"pretrain": _pretrain_text, "sft": _sft_messages, "dpo": _dpo_triple}


def _stream(paths: list[str], kind: str, on_error: OnError) -> Iterator:
    for block in read_blocks(paths, kind):
        yield from parse_block(block, kind, on_error)


def iter_pretrain(paths: list[str], on_error: OnError = None) -> Iterator[tuple[str, str]]:
    """(where, text) for every pretraining document."""
    return _stream(paths, "pretrain", on_error)


def iter_sft(paths: list[str], on_error: OnError = None) -> Iterator[tuple[str, list[dict]]]:
    """(where, messages) for every conversation; messages end with an assistant turn."""
    return _stream(paths, "sft", on_error)


def iter_dpo(paths: list[str], on_error: OnError = None) -> Iterator[tuple[str, dict]]:
    """(where, {"prompt": messages, "chosen": str, "rejected": str}) for every preference triple."""
    return _stream(paths, "dpo", on_error)
