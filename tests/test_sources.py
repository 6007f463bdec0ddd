"""data/sources.py: every input format and field convention, and one-line errors naming file:line."""

import builtins
import gzip
import json
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import sources
from data.sources import iter_dpo, iter_pretrain, iter_sft
from errors import NanozhError

U = {"role": "user", "content": "你好"}
A = {"role": "assistant", "content": "你好！有什么可以帮你？"}


def write_jsonl(path, rows, gz=False):
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def error_of(it) -> str:
    with pytest.raises(NanozhError) as e:
        list(it)
    return str(e.value)


# ----------------------------------------------------------------------------- formats

def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("第一段\n第二行\n\n\n第二篇\n  \n第三篇\n", encoding="utf-8")
    assert list(iter_pretrain([str(p)])) == [
        (f"{p}:1", "第一段\n第二行"), (f"{p}:5", "第二篇"), (f"{p}:7", "第三篇")]


def test_gzipped_txt_and_jsonl_read_like_plain_ones(tmp_path):
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write("甲\n\n乙")
    write_jsonl(tmp_path / "b.jsonl.gz", [{"text": "丙"}], gz=True)
    texts = [t for _, t in iter_pretrain([str(tmp_path / "a.txt.gz"), str(tmp_path / "b.jsonl.gz")])]
    assert texts == ["甲", "乙", "丙"]


def test_jsonl_pretrain_reads_text_then_content_and_skips_blank_lines(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "一", "id": 1}\n\n{"content": "二"}\n"三"\n', encoding="utf-8")
    assert list(iter_pretrain([str(p)])) == [(f"{p}:1", "一"), (f"{p}:3", "二"), (f"{p}:4", "三")]


def test_json_array_is_streamed_element_by_element(tmp_path):
    rows = [{"text": f"第{i}篇" * (i + 1)} for i in range(50)]
    p = tmp_path / "a.json"
    p.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    got = list(iter_pretrain([str(p)]))
    assert [t for _, t in got] == [r["text"] for r in rows]
    assert got[1][0] == f"{p}:5"  # indent=1 puts element i on line 2 + 3 * i


def test_json_decoding_does_not_depend_on_chunk_boundaries(tmp_path):
    rows = [{"text": "文" * i, "n": 1.5 * i} for i in range(30)] + [17, "x"]
    p = tmp_path / "a.json"
    p.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    for chunk in (1, 2, 3, 7, 100):
        assert [r for _, r in sources._json_records(str(p), chunk)] == rows


def test_parquet_rows_are_read_in_batches(tmp_path, monkeypatch):
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": [f"文档{i}" for i in range(2500)], "source": ["s"] * 2500}), p,
                   compression="zstd", row_group_size=1000)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 1000)  # blocks of a few dozen rows
    assert len(list(sources.read_blocks([str(p)], "pretrain"))) > 20
    assert list(iter_pretrain([str(p)])) == [(f"{p}:{i + 1}", f"文档{i}") for i in range(2500)]


def test_parquet_blocks_stay_near_block_bytes_when_row_sizes_vary(tmp_path, monkeypatch):
    # long rows first, then short ones: blocks cut by the file's average row would be ~10x too big
    texts = ["长" * 200 + str(i) for i in range(200)] + [f"短{i}" for i in range(2000)]
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": texts}), p)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 6000)
    blocks = list(sources.read_blocks([str(p)], "pretrain"))
    assert max(b.data.nbytes for b in blocks) <= 2 * 6000
    assert sum(len(b.data) for b in blocks) == len(texts)
    assert list(iter_pretrain([str(p)])) == [(f"{p}:{i + 1}", t) for i, t in enumerate(texts)]


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_blocks_cut_at_line_ends_and_keep_line_numbers(tmp_path, monkeypatch, gz):
    rows = [{"text": "字" * (i % 50 + 1)} for i in range(300)]
    p = write_jsonl(tmp_path / ("a.jsonl.gz" if gz else "a.jsonl"), rows, gz=gz)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 100)  # shorter than many lines: a block waits for its line end
    blocks = list(sources.read_blocks([p], "pretrain"))
    assert len(blocks) > 50 and all(b.data.endswith(b"\n") for b in blocks)
    assert list(iter_pretrain([p])) == [(f"{p}:{i + 1}", r["text"]) for i, r in enumerate(rows)]


def test_non_utf8_jsonl_names_the_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"text": "ok"}\n' + '{"text": "中文"}\n'.encode("gbk"))
    assert error_of(iter_pretrain([str(p)])) == f"nanozh: {p}:2: not valid UTF-8 (convert the file to UTF-8)"


def test_directory_expands_to_its_supported_files_sorted(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "乙"}])
    (tmp_path / "a.txt").write_text("甲", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert [t for _, t in iter_pretrain([str(tmp_path)])] == ["甲", "乙"]


def test_files_are_streamed_not_read_whole(tmp_path, monkeypatch):
    p = tmp_path / "big.jsonl"
    write_jsonl(p, [{"text": "字" * 100}] * 2000)
    real_open = builtins.open

    class NoWholeRead:
        def __init__(self, f):
            self.f = f

        def read(self, size=-1):
            assert size is not None and size >= 0, "a reader called read() on the whole file"
            return self.f.read(size)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __iter__(self):
            return iter(self.f)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr(builtins, "open", lambda *a, **k: NoWholeRead(real_open(*a, **k)))
    assert sum(1 for _ in iter_pretrain([str(p)])) == 2000
    q = tmp_path / "big.json"
    real_open(q, "w", encoding="utf-8").write(json.dumps([{"text": "字" * 100}] * 2000))
    assert sum(1 for _ in iter_pretrain([str(q)])) == 2000


# ----------------------------------------------------------------------------- SFT conventions

def test_sft_messages_and_sharegpt_conversations(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [
        {"messages": [U, A], "source": "x"},
        {"conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": "答"}], "system": "你是助手"},
        {"messages": [{"role": "system", "content": "简短回答"}, U, A, {"role": "user", "content": "再说"}, A]},
    ])
    got = [m for _, m in iter_sft([p])]
    assert got[0] == [U, A]
    assert got[1] == [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "问"},
                      {"role": "assistant", "content": "答"}]
    assert [m["role"] for m in got[2]] == ["system", "user", "assistant", "user", "assistant"]


def test_sft_prompt_response_and_instruction_input_output(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [
        {"prompt": "一加一？", "response": "二。"},
        {"instruction": "翻译", "input": "hello", "output": "你好"},
        {"instruction": "讲个笑话", "input": "", "output": "好的……"},
    ])
    got = [m for _, m in iter_sft([p])]
    assert got[0] == [{"role": "user", "content": "一加一？"}, {"role": "assistant", "content": "二。"}]
    assert got[1][0] == {"role": "user", "content": "翻译\nhello"}
    assert got[2][0] == {"role": "user", "content": "讲个笑话"}


def test_sft_parquet_with_message_lists(tmp_path):
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"messages": [[U, A]], "source": ["s"]}), p)
    assert list(iter_sft([str(p)])) == [(f"{p}:1", [U, A])]


@pytest.mark.parametrize("row, message", [
    ({"messages": [U, {"role": "bot", "content": "答"}]}, "unknown role 'bot' in turn 2"),
    ({"messages": [U]}, "conversation has no assistant turn"),
    ({"messages": [U, A, U]}, "conversation ends with a user turn"),
    ({"messages": [U, {"role": "assistant", "content": "  "}]}, "empty content in turn 2"),
    ({"question": "?", "answer": "!"}, "no conversation fields (fields: question, answer)"),
])
def test_bad_sft_records_name_file_and_line(tmp_path, row, message):
    p = write_jsonl(tmp_path / "a.jsonl", [{"messages": [U, A]}, row])
    err = error_of(iter_sft([p]))
    assert err.startswith(f"nanozh: {p}:2: {message} (") and "\n" not in err


def test_malformed_jsonl_line_is_one_line_error(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "好"}\n{"text": "坏"\n', encoding="utf-8")
    assert error_of(iter_pretrain([str(p)])) == (
        f"nanozh: {p}:2: malformed JSON (Expecting ',' delimiter at column 13) (fix or remove the line)")


def test_on_error_reports_and_skips_bad_records(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "a"}]}\nnot json\n'
                 + json.dumps({"messages": [U, A]}, ensure_ascii=False) + "\n", encoding="utf-8")
    errors = []
    assert list(iter_sft([str(p)], on_error=errors.append)) == [(f"{p}:3", [U, A])]
    assert [str(e).split(": ")[1] for e in errors] == [f"{p}:1", f"{p}:2"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_lone_surrogate_escape_is_a_bad_record_but_a_pair_is_an_emoji(tmp_path, suffix):
    # "\\ud800" alone is valid JSON but not Unicode: nothing downstream could encode it to UTF-8
    lines = ['{"text": "好文档"}', '{"text": "坏\\uD800文档"}', '{"text": "笑\\ud83d\\ude00"}']
    p = tmp_path / f"a{suffix}"
    p.write_text("\n".join(lines) + "\n" if suffix == ".jsonl" else "[" + ",\n".join(lines) + "]", encoding="utf-8")
    errors = []
    assert [t for _, t in iter_pretrain([str(p)], on_error=errors.append)] == ["好文档", "笑😀"]
    assert [str(e) for e in errors] == [
        f"nanozh: {p}:2: a lone surrogate escape (\\ud800-\\udfff) is not valid Unicode (fix or remove the record)"]


def test_parquet_text_column_with_nulls_falls_back_to_the_rules_row_by_row(tmp_path):
    # a whole string column is taken as is; one null sends its batch through the per-row rules,
    # which take `content` instead or name the row
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["一", None, "三", None], "content": ["x", "二", "y", None]}), p)
    errors = []
    assert list(iter_pretrain([str(p)], on_error=errors.append)) == [(f"{p}:1", "一"), (f"{p}:2", "二"), (f"{p}:3", "三")]
    assert [str(e) for e in errors] == [
        f"nanozh: {p}:4: no text field (fields: text, content) (pretraining reads 'text' or 'content')"]
    q = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": pa.array(["甲", "乙"], type=pa.large_string())}), q)
    assert list(iter_pretrain([str(q)])) == [(f"{q}:1", "甲"), (f"{q}:2", "乙")]


def test_damaged_parquet_page_is_a_one_line_error(tmp_path):
    rng = random.Random(0)
    rows = ["".join(rng.choice("春夏秋冬山水风月花鸟虫鱼") for _ in range(200)) for _ in range(2000)]
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": rows}), p, compression="zstd", data_page_size=4096, row_group_size=500)
    data = bytearray(p.read_bytes())
    data[len(data) // 2:len(data) // 2 + 2000] = bytes(2000)  # zeros over pages in the middle of the file
    p.write_bytes(bytes(data))
    message = error_of(iter_pretrain([str(p)]))
    match = re.fullmatch(rf"nanozh: {p}:(\d+): damaged Parquet data in this row or a later one \(.+\) "
                         r"\(re-download or rewrite the file\)", message)
    assert match and 1 < int(match[1]) <= 1000  # the rows before the damage were read


@pytest.mark.parametrize("damage", ["truncated", "bad deflate data", "bad checksum"])
def test_damaged_gzip_is_a_one_line_error(tmp_path, damage):
    p = tmp_path / "a.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": f"第{i}行" * 20}, ensure_ascii=False) + "\n" for i in range(3000))
    data = bytearray(p.read_bytes())
    if damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "bad deflate data":
        data[12:40] = bytes(range(200, 228))  # the first deflate block's header: zlib.error
    else:
        data[-8] ^= 0xFF  # the CRC-32 in the trailer
    p.write_bytes(bytes(data))
    assert re.fullmatch(rf"nanozh: {p}: damaged gzip file \(.+\) \(re-download or recompress it\)",
                        error_of(iter_pretrain([str(p)])))


def test_pretrain_row_without_text_names_its_fields(tmp_path):
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": ["正文"], "title": ["标题"]}), p)
    assert error_of(iter_pretrain([str(p)])) == (
        f"nanozh: {p}:1: no text field (fields: body, title) (pretraining reads 'text' or 'content')")


def test_missing_path_and_unsupported_file_are_errors(tmp_path):
    assert error_of(iter_pretrain([str(tmp_path / "nope.jsonl")])).startswith(f"nanozh: {tmp_path}/nope.jsonl: no such file")
    (tmp_path / "a.csv").write_text("x", encoding="utf-8")
    assert "unsupported file type" in error_of(iter_pretrain([str(tmp_path / "a.csv")]))
    (tmp_path / "c.txt").write_text("一段话", encoding="utf-8")
    assert "plain text holds no conversations" in error_of(iter_sft([str(tmp_path / "c.txt")]))


def test_non_utf8_and_truncated_json_array_are_errors(tmp_path):
    (tmp_path / "a.txt").write_bytes("中文".encode("gbk"))
    assert "not valid UTF-8" in error_of(iter_pretrain([str(tmp_path / "a.txt")]))
    (tmp_path / "b.json").write_text('[{"text": "一"},\n{"text": "二"}', encoding="utf-8")
    assert error_of(iter_pretrain([str(tmp_path / "b.json")])) == (
        f"nanozh: {tmp_path}/b.json:2: JSON array is not closed (the file may be truncated)")


# ----------------------------------------------------------------------------- DPO conventions

def test_dpo_prompt_as_string_or_messages_and_answers_as_strings_or_turns(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [
        {"prompt": "一加一？", "chosen": "二。", "rejected": "三。"},
        {"prompt": [U, A, {"role": "user", "content": "再见"}], "chosen": "再见！", "rejected": "不"},
        {"prompt": [U], "chosen": [U, {"role": "assistant", "content": "好"}],
         "rejected": {"from": "gpt", "value": "坏"}},
        {"instruction": "翻译", "input": "cat", "chosen": "猫", "rejected": "狗"},
    ])
    got = [t for _, t in iter_dpo([p])]
    assert got[0] == {"prompt": [{"role": "user", "content": "一加一？"}], "chosen": "二。", "rejected": "三。"}
    assert len(got[1]["prompt"]) == 3 and got[1]["chosen"] == "再见！"
    assert (got[2]["chosen"], got[2]["rejected"]) == ("好", "坏")
    assert got[3]["prompt"] == [{"role": "user", "content": "翻译\ncat"}]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "问", "chosen": "好"}, "missing field 'rejected' (fields: prompt, chosen)"),
    ({"chosen": "好", "rejected": "坏"}, "missing field 'prompt' (fields: chosen, rejected)"),
    ({"prompt": [U, A], "chosen": "好", "rejected": "坏"}, "prompt does not end with a user turn"),
    ({"prompt": "问", "chosen": "", "rejected": "坏"}, "field 'chosen' is empty or not a string"),
    ({"prompt": "问", "chosen": [U], "rejected": "坏"}, "the last turn of 'chosen' is not the assistant's"),
])
def test_bad_dpo_records_name_file_and_line(tmp_path, row, message):
    p = write_jsonl(tmp_path / "a.jsonl", [row])
    assert error_of(iter_dpo([p])).startswith(f"nanozh: {p}:1: {message} (")
