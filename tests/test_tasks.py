"""tasks.py and eval.py --task: the triples scorer gives hand-computed numbers on exact, partial,
empty and malformed answers, and the same numbers as the task's own score.py; the bundled task keeps
its test split out of its train split and out of the bundled SFT/DPO corpus; a model fine-tuned on a
handful of examples for a few steps scores a higher F1 on them than before.
"""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

import tasks
import train_sft
from conftest import train_in_process
from data.prepare import main as prepare_main
from errors import NanozhError

ROOT = Path(__file__).resolve().parent.parent
TASK = ROOT / "data" / "tasks" / "kdconv_triples"


def read(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_triples_f1_on_hand_made_answers():
    gold = [{"triples": [["恋恋笔记本", "导演", "尼克·卡索维茨"]]},
            {"triples": [["瑞恩·高斯林", "国籍", "加拿大"], ["瑞恩·高斯林", "职业", "演员"]]},
            {"response": "[(爱乐之城,主演,瑞恩·高斯林，艾玛·斯通)]"},
            {"triples": [["周润发", "出生地", "香港南丫岛"]]}]
    answers = ["[(恋恋笔记本,导演,尼克·卡索维茨),(恋恋笔记本,导演,别人)]",   # 1 right, 1 wrong
               "【（高斯林， 国籍，加拿大）】",                                 # wrong entity: only (attribute, value) right
               "[]",                                                            # empty
               "周润发出生在香港"]                                              # malformed: no triple parsed
    summary, per = tasks.score("triples_f1", gold, answers)
    # triples: tp 1, gold 1 + 2 + 1 + 1 = 5, predicted 2 + 1 = 3; pairs: tp 2 of gold 5, predicted 3
    assert (summary["precision"], summary["recall"], summary["f1"]) == (0.3333, 0.2, 0.25)
    assert (summary["av_precision"], summary["av_recall"], summary["av_f1"]) == (0.6667, 0.4, 0.5)
    assert [e["f1"] for e in per] == [0.6667, 0.0, 0.0, 0.0]
    assert tasks.parse_triples("[(爱乐之城,主演,瑞恩·高斯林, 艾玛·斯通)]") == [("爱乐之城", "主演", "瑞恩·高斯林, 艾玛·斯通")]
    assert tasks.score("triples_f1", gold[:1], ["[(恋恋笔记本，导演，尼克·卡索维茨)]"])[0]["f1"] == 1.0  # full-width commas
    assert tasks.score("exact_match", [{"response": "北京"}, {"response": "是"}], [" 北京 ", "否"])[0]["exact_match"] == 0.5


def test_triples_f1_equals_the_tasks_own_scorer(tmp_path):
    gold = read(TASK / "dev.jsonl")
    answers = []
    for i, r in enumerate(gold):  # right, a triple dropped, full-width, empty, garbage, entity swapped
        t = [tuple(x) for x in r["triples"]]
        answers.append([r["response"], "[" + ",".join(f"({e},{a},{v})" for e, a, v in t[1:]) + "]",
                        "【" + "，".join(f"（{e}，{a}，{v}）" for e, a, v in t) + "】", "", "无",
                        "[" + ",".join(f"(某人,{a},{v})" for _, a, v in t) + "]"][i % 6])
    (tmp_path / "pred.jsonl").write_text("".join(json.dumps({"response": a}, ensure_ascii=False) + "\n" for a in answers))
    theirs = subprocess.run([sys.executable, str(TASK / "score.py"), str(TASK / "dev.jsonl"), str(tmp_path / "pred.jsonl")],
                            capture_output=True, text=True, check=True).stdout
    ours = tasks.score("triples_f1", gold, answers)[0]
    assert ours == json.loads(theirs) and 0.3 < ours["f1"] < 0.9


def test_test_split_is_in_no_training_set():
    test = {r["text"] for r in read(TASK / "test.jsonl")}
    assert len(test) > 1000
    train = read(TASK / "train.jsonl.gz")
    assert not test & {r["text"] for r in train} and not {r["prompt"] for r in read(TASK / "test.jsonl")} & {r["prompt"] for r in train}
    assert not test & {r["text"] for r in read(TASK / "dev.jsonl")}
    bundled = set()
    for name in ("sft.jsonl.gz", "dpo.jsonl.gz"):
        for rec in read(ROOT / "data" / "corpus" / name):
            turns = rec.get("messages", []) + (rec["prompt"] if isinstance(rec.get("prompt"), list) else [])
            bundled |= {m["content"].strip() for m in turns} | {rec.get("chosen", ""), rec.get("rejected", "")}
    assert not test & bundled


def test_malformed_task_file_is_a_one_line_error(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"prompt": "x", "triples": [["a", "b"]]}\n')
    with pytest.raises(NanozhError, match=r"t.jsonl:1: .*entity, attribute, value"):
        tasks.read_task(str(tmp_path / "t.jsonl"), "triples_f1")


def evaluate(model: Path, task: Path, out: Path) -> dict:
    result = subprocess.run([sys.executable, "eval.py", "--model", str(model), "--task", str(task), "--metric",
                             "triples_f1", "--out", str(out), "--max_new_tokens", "24", "--device", "cpu"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_fine_tuning_on_a_few_examples_raises_their_f1(init_model, tmp_path):
    examples = [r for r in read(TASK / "train.jsonl.gz") if len(r["response"]) < 22 and len(r["text"]) < 14][:4]
    task = tmp_path / "four.jsonl"
    task.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in examples), encoding="utf-8")
    prepare_main(["--kind", "sft", "--input", str(task), "--tokenizer", str(init_model / "tokenizer.model"), "--out",
                  str(tmp_path / "shards"), "--workers", "1", "--val_fraction", "0", "--no_near_dedup"])
    before = evaluate(init_model, task, tmp_path / "before.jsonl")
    train_in_process(train_sft, train_sft.SFTConfig, [
        f"--data={tmp_path / 'shards'}", f"--init_from={init_model}", f"--out_dir={tmp_path / 'run'}", "--device=cpu",
        "--dtype=float32", "--batch_size=4", "--max_steps=40", "--lr=1e-2", "--warmup_steps=2", "--log_every=10",
        "--eval_every=0", "--save_every=1000"])
    after = evaluate(tmp_path / "run" / "latest", task, tmp_path / "after.jsonl")
    assert before["examples"] == after["examples"] == 4 and after["f1"] > before["f1"]
    answers = read(tmp_path / "after.jsonl")
    assert {"answer", "tp", "f1", "prompt"} <= answers[0].keys()
