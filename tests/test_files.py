"""files.py and errors.py: a write is all or nothing, a JSONL problem names its file and line, and
every user error is exactly one line."""

import os

import pytest

from errors import NanozhError, user_error
from files import atomic_path, read_jsonl, write_jsonl, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "out.txt"
    write_text_atomic(path, "old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_a_written_file_has_the_permissions_open_would_give_it(tmp_path):
    umask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "config.json", "{}")
    finally:
        os.umask(umask)
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600


def test_jsonl_round_trips_chinese_and_names_a_bad_line(tmp_path):
    path = tmp_path / "a.jsonl"
    write_jsonl(path, [{"prompt": "你好"}, {"prompt": "再见"}])
    assert "你好" in path.read_text(encoding="utf-8")  # readable, not \u escapes
    assert list(read_jsonl(path)) == [(1, {"prompt": "你好"}), (2, {"prompt": "再见"})]
    path.write_text('{"a": 1}\n\n{"a": 2,\n{"a": 3}\n', encoding="utf-8")
    with pytest.raises(NanozhError) as e:
        list(read_jsonl(path))
    assert str(e.value).startswith(f"nanozh: {path}:3: malformed JSON (")


def test_only_a_cut_last_line_may_be_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo', encoding="utf-8")
    assert [r["step"] for _, r in read_jsonl(path, skip_bad_last_line=True)] == [1, 2]
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n', encoding="utf-8")
    with pytest.raises(NanozhError, match=":2: malformed JSON"):
        list(read_jsonl(path, skip_bad_last_line=True))


def test_user_errors_are_one_line_even_when_a_library_message_is_not():
    e = user_error("a.parquet", "cannot read (Invalid: bad page\nIn ../src/parquet/reader.cc:123\n  detail)", "fix it")
    assert str(e) == "nanozh: a.parquet: cannot read (Invalid: bad page In ../src/parquet/reader.cc:123 detail) (fix it)"

