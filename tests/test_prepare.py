"""data/prepare.py end to end on small generated corpora: what it keeps, drops and writes, and what
a bad input gets (one line, nothing left behind)."""

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data.prepare import Workers, main
from data.shards import open_shards, read_meta
from errors import NanozhError
from tokenizer.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = str(ROOT / "tokenizer" / "tokenizer.model")
HAN = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处府研质信门"


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return str(path)


def random_text(rng, n):
    return "".join(rng.choice(list(HAN), size=n))


def run_prepare(capsys, kind, inputs, out, *flags):
    main(["--kind", kind, "--input", *inputs, "--tokenizer", TOKENIZER, "--out", str(out), "--workers", "1", *flags])
    return read_meta(out), capsys.readouterr()


def run_cli(kind, inputs, out, *flags):
    cmd = [sys.executable, "-m", "data.prepare", "--kind", kind, "--input", *inputs,
           "--tokenizer", TOKENIZER, "--out", str(out), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)


def split_docs(shard_dir, split, tok):
    stream = np.concatenate([s.tokens for s in open_shards(shard_dir, split)]).tolist()
    docs, start = [], 0
    for i, t in enumerate(stream):
        if t == tok.eos_id:
            docs.append(tok.decode(stream[start:i]))
            start = i + 1
    assert start == len(stream), "every document ends with eos"
    return docs


def test_pretrain_end_to_end(tmp_path, capsys):
    rng = np.random.default_rng(0)
    docs = [random_text(rng, int(n)) for n in rng.integers(20, 200, size=60)]
    rows = [{"text": d} for d in docs] + [{"text": docs[3]}, {"text": "太短了"}, {"text": docs[5] + "\u3000"}]
    meta, out = run_prepare(capsys, "pretrain", [write_jsonl(tmp_path / "a.jsonl", rows)], tmp_path / "out",
                            "--val_fraction", "0.2")
    tok = Tokenizer(tmp_path / "out")
    train, val = split_docs(tmp_path / "out", "train", tok), split_docs(tmp_path / "out", "val", tok)
    assert sorted(train + val) == sorted(docs)  # duplicates and the short one are gone, the rest intact
    assert train and val and meta["splits"]["val"]["examples"] == len(val)
    assert meta["kind"] == "pretrain" and meta["tokenizer_sha256"] == tok.sha256
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == open(TOKENIZER, "rb").read()
    assert "prepare pretrain: " in out.out and "tokens/s" in out.out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left


def test_a_temp_dir_left_by_a_killed_run_is_named_and_left_alone(tmp_path, capsys):
    stale = tmp_path / ".out.tmp-99999"  # kill -9 gives prepare no chance to remove its temp dir
    stale.mkdir()
    (stale / "train_00000.bin").write_bytes(b"half")
    rows = [{"text": random_text(np.random.default_rng(3), 100)}]
    _, out = run_prepare(capsys, "pretrain", [write_jsonl(tmp_path / "a.jsonl", rows)], tmp_path / "out")
    assert f"note: {stale} is from another run into {tmp_path / 'out'} that has not finished" in out.err
    assert (stale / "train_00000.bin").read_bytes() == b"half"  # it may be a run still going


def test_split_is_by_document_not_by_position(tmp_path, capsys):
    rng = np.random.default_rng(1)
    docs = [random_text(rng, 50) for _ in range(40)]
    a = tmp_path / "a.jsonl"
    flags = ("--val_fraction", "0.3")
    write_jsonl(a, [{"text": d} for d in docs])
    run_prepare(capsys, "pretrain", [str(a)], tmp_path / "one", *flags)
    write_jsonl(a, [{"text": d} for d in reversed(docs)])
    run_prepare(capsys, "pretrain", [str(a)], tmp_path / "two", *flags)
    tok = Tokenizer(TOKENIZER)
    assert sorted(split_docs(tmp_path / "one", "val", tok)) == sorted(split_docs(tmp_path / "two", "val", tok))


def test_workers_give_the_same_shards_as_one_process(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("data.sources.BLOCK_BYTES", 8192)  # ~30 blocks, spread over the workers
    rng = np.random.default_rng(2)
    docs = [random_text(rng, 300) for _ in range(300)]
    docs[200] = docs[10]  # a duplicate in another block than its first
    # near duplicates (2 of 300 characters changed) in the same block as their first and in another
    docs[21], docs[250] = docs[20][:100] + "甲乙" + docs[20][102:], docs[20][:200] + "丙丁" + docs[20][202:]
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    meta, _ = run_prepare(capsys, "pretrain", [path], tmp_path / "one", "--val_fraction", "0.1")
    main(["--kind", "pretrain", "--input", path, "--tokenizer", TOKENIZER, "--out", str(tmp_path / "two"),
          "--workers", "3", "--val_fraction", "0.1"])
    assert meta["clean"]["dropped"] == {"exact": 1, "near": 2} and read_meta(tmp_path / "two")["clean"] == meta["clean"]
    for name in ("train_00000.bin", "val_00000.bin"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_shards_do_not_depend_on_how_a_block_is_grouped(tmp_path, capsys, monkeypatch):
    # a worker hashes a block's texts MINHASH_GROUP_CHARS characters and tokenizes them
    # ENCODE_GROUP texts at a time
    rng = np.random.default_rng(3)
    docs = [random_text(rng, n) for n in rng.integers(1, 400, size=300)]
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    monkeypatch.setattr("data.prepare.ENCODE_GROUP", 1000)
    meta, _ = run_prepare(capsys, "pretrain", [path], tmp_path / "whole", "--val_fraction", "0.1")
    monkeypatch.setattr("data.clean.MINHASH_GROUP_CHARS", 500)  # ~100 groups instead of one
    monkeypatch.setattr("data.prepare.ENCODE_GROUP", 7)
    grouped, _ = run_prepare(capsys, "pretrain", [path], tmp_path / "groups", "--val_fraction", "0.1")
    assert grouped["clean"] == meta["clean"] and meta["splits"]["val"]["examples"] > 0
    for name in ("train_00000.bin", "val_00000.bin"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "groups" / name).read_bytes()


def _no_init():
    pass


def _slow_square(x):
    time.sleep(0.02 * (x % 3))  # later tasks often finish first
    return x * x


def _fail_on_5(x):
    if x == 5:
        raise ValueError("task 5 is bad")
    return x


def _kill_self_on_5(x):
    if x == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def test_worker_results_come_back_in_input_order():
    with Workers(3, _slow_square, _no_init, ()) as workers:
        assert list(workers.map(range(20), in_flight=5)) == [x * x for x in range(20)]


def test_a_worker_error_reaches_the_main_process():
    with pytest.raises(RuntimeError, match="task 5 is bad"), Workers(2, _fail_on_5, _no_init, ()) as workers:
        list(workers.map(range(10), in_flight=4))


def _frozen_objects(_):
    return gc.get_freeze_count()


def test_workers_fork_with_the_collector_kept_off_shared_objects_and_restore_it():
    # a full collection in any process would otherwise copy every page of old objects it visits
    with Workers(2, _frozen_objects, _no_init, ()) as workers:
        assert gc.get_freeze_count() > 1000
        assert min(workers.map(range(4), in_flight=2)) > 1000
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), Workers(2, _fail_on_5, _no_init, ()) as workers:
        list(workers.map(range(10), in_flight=4))
    assert gc.get_freeze_count() == 0


def test_a_killed_worker_is_a_one_line_error_not_a_hang():
    # multiprocessing.Pool would wait forever here for task 5's result
    with pytest.raises(NanozhError, match=r"worker process \d+: was killed by signal 9 \(out of memory"):
        with Workers(2, _kill_self_on_5, _no_init, ()) as workers:
            list(workers.map(range(10), in_flight=4))


def test_arrow_allocates_from_malloc_in_prepare():
    # its default (mimalloc) keeps freed memory in a reserve that numpy cannot reuse; the choice
    # must be made before pyarrow is imported, so it is checked in a fresh process
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    code = "import data.prepare, pyarrow; print(pyarrow.default_memory_pool().backend_name)"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "system", run.stderr


def test_every_thread_allocates_from_one_malloc_arena_in_prepare():
    # glibc gives each thread an arena of its own, whose freed memory no other thread reuses; the
    # limit must be set before pyarrow starts its thread, so it is checked in a fresh process
    code = ("import ctypes, threading, data.prepare\n"
            "t = threading.Thread(target=lambda: [bytearray(1000) for _ in range(100)])\n"
            "t.start(); t.join(); ctypes.CDLL(None).malloc_stats()")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.stderr.count("Arena ") == 1, run.stderr


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_workers_exit_when_the_main_process_is_killed(tmp_path):
    # they used to wait forever for their next task: each held a copy of its task pipe's write end
    cmd = [sys.executable, "-m", "data.prepare", "--kind", "pretrain", "--input",
           *[str(ROOT / "data" / "corpus" / "pretrain")] * 5, "--tokenizer", TOKENIZER,
           "--out", str(tmp_path / "out"), "--workers", "2"]
    main_process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    workers = []
    try:
        deadline = time.time() + 60
        while len(workers) < 2 and time.time() < deadline and main_process.poll() is None:
            with open(f"/proc/{main_process.pid}/task/{main_process.pid}/children") as f:
                workers = [int(pid) for pid in f.read().split()]
            time.sleep(0.02)
        assert len(workers) == 2, "prepare did not start its workers"
        time.sleep(0.3)  # into the run: ~100 MB of text takes a few seconds
        main_process.kill()
        assert main_process.wait() == -signal.SIGKILL
        deadline = time.time() + 10
        while any(map(_alive, workers)) and time.time() < deadline:
            time.sleep(0.02)
        assert not any(map(_alive, workers))
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def chat(*turns):
    roles = ["system"] if len(turns) % 2 else []
    roles += ["user", "assistant"] * (len(turns) // 2)
    return {"messages": [{"role": r, "content": c} for r, c in zip(roles, turns)]}


def test_sft_end_to_end_mask_truncation_and_drops(tmp_path, capsys):
    tok = Tokenizer(TOKENIZER)
    rng = np.random.default_rng(3)
    short = [chat("你是助手。", "你好", random_text(rng, 10)), chat("问题" + random_text(rng, 5), random_text(rng, 30))]
    long_turns = [random_text(rng, 40) for _ in range(6)]
    max_len = len(tok.render_chat(chat(*long_turns[:4])["messages"])[0]) + 5  # two exchanges fit, not three
    rows = short + [chat(*long_turns), chat(random_text(rng, 400), "好"), chat("你好", "好", "再见")]
    rows[-1]["messages"].append({"role": "system", "content": "太晚了"})  # a system turn after the first
    rows[-1]["messages"].append({"role": "assistant", "content": "好"})
    meta, out = run_prepare(capsys, "sft", [write_jsonl(tmp_path / "s.jsonl", rows)], tmp_path / "out",
                            "--max_len", str(max_len), "--val_fraction", "0")
    expected = [m["messages"] for m in short] + [chat(*long_turns[:4])["messages"]]
    (shard,) = open_shards(tmp_path / "out", "train", "sft")
    assert shard.n_examples == 3
    for i, messages in enumerate(expected):
        ids, mask = tok.render_chat(messages)
        a, b = shard.offsets[i], shard.offsets[i + 1]
        assert shard.tokens[a:b].tolist() == ids and shard.mask[a:b].tolist() == mask
    assert (meta["counts"]["truncated"], meta["clean"]["dropped"]["too_long"], meta["counts"]["malformed"]) == (1, 1, 1)
    assert "truncated" in out.out and "too_long" in out.out


def test_dpo_end_to_end_spans_and_drops(tmp_path, capsys):
    tok = Tokenizer(TOKENIZER)
    rows = [{"prompt": "一加一等于几？", "chosen": "等于二。", "rejected": "不知道"},
            {"prompt": [{"role": "system", "content": "简短回答"}, {"role": "user", "content": "天空是什么颜色？"}],
             "chosen": "蓝色。", "rejected": "绿色的，因为草是绿色的。"},
            {"prompt": "一样", "chosen": "相同的回答", "rejected": "相同的回答"},
            {"prompt": "太长" * 300, "chosen": "好", "rejected": "不好"}]
    meta, out = run_prepare(capsys, "dpo", [write_jsonl(tmp_path / "d.jsonl", rows)], tmp_path / "out",
                            "--val_fraction", "0", "--max_len", "128")
    (shard,) = open_shards(tmp_path / "out", "train", "dpo")
    assert shard.n_examples == 2
    for (off, p, c, r), row in zip(shard.index.tolist(), rows):
        prompt = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
        assert shard.tokens[off:off + p].tolist() == tok.render_chat(prompt, add_generation_prompt=True)[0]
        assert shard.tokens[off + p:off + p + c].tolist() == tok.encode(row["chosen"]) + [tok.im_end_id]
        assert shard.tokens[off + p + c:off + p + c + r].tolist() == tok.encode(row["rejected"]) + [tok.im_end_id]
    assert (meta["clean"]["dropped"]["identical_answers"], meta["clean"]["dropped"]["too_long"]) == (1, 1)
    assert "identical_answers" in out.out and "too_long" in out.out


def assert_one_line_error(result, prefix):
    assert result.returncode == 1 and result.stderr.splitlines()[-1].startswith(prefix), result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("nanozh:")]
    assert "Traceback" not in result.stderr and errors == [result.stderr.splitlines()[-1]]


def test_malformed_line_with_strict_is_one_line_error_and_leaves_nothing(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "第一篇文档，足够长了吧。"}, "{not json", {"text": "第三篇文档，也足够长了。"}])
    result = run_cli("pretrain", [path], tmp_path / "out", "--strict")
    assert_one_line_error(result, f"nanozh: {path}:2: malformed JSON")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


def test_malformed_line_without_strict_is_reported_and_skipped(tmp_path, capsys):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "第一篇文档，足够长了吧。"}, "{not json", {"text": "第三篇文档，也足够长了。"}])
    meta, out = run_prepare(capsys, "pretrain", [path], tmp_path / "out")
    assert meta["counts"]["malformed"] == 1 and meta["splits"]["train"]["examples"] + meta["splits"]["val"]["examples"] == 2
    assert f"skipped: nanozh: {path}:2: malformed JSON" in out.err


def test_missing_field_and_empty_corpus_are_errors_and_leave_nothing(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"body": "没有text字段的文档"}])
    assert_one_line_error(run_cli("pretrain", [path], tmp_path / "out", "--strict"), f"nanozh: {path}:1: no text field")
    short = write_jsonl(tmp_path / "b.jsonl", [{"text": "短"}, {"text": "也短"}])
    assert_one_line_error(run_cli("pretrain", [short], tmp_path / "out"), f"nanozh: {short}: no pretrain examples survived")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl"]


def test_failed_rerun_leaves_existing_output_untouched(tmp_path, capsys):
    good = write_jsonl(tmp_path / "a.jsonl", [{"text": "第一篇文档，足够长了吧。"}, {"text": "第二篇文档，也足够长了。"}])
    run_prepare(capsys, "pretrain", [good], tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    bad = write_jsonl(tmp_path / "b.jsonl", [{"text": "短"}])
    assert_one_line_error(run_cli("pretrain", [bad], tmp_path / "out"), f"nanozh: {bad}: no pretrain examples survived")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_refuses_to_replace_a_directory_that_is_not_shards(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    good = write_jsonl(tmp_path / "a.jsonl", [{"text": "第一篇文档，足够长了吧。"}])
    assert_one_line_error(run_cli("pretrain", [good], tmp_path), f"nanozh: {tmp_path}: exists and is not a shard directory")
    assert (tmp_path / "notes.txt").read_text() == "mine"
