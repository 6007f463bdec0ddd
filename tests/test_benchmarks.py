"""Specification of eval.py --ceval / --cmmlu: the official CSV layouts (built here: the real files
are evaluation data and are not bundled), the two scorings on a model rigged to prefer one answer,
few-shot prompts, C-Eval's submission JSON, and file:line errors for malformed rows."""

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import benchmarks
import eval as nanozh_eval
from model import ModelConfig, Transformer
from tokenizer.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = ["甲方", "乙方", "丙方", "丁方"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(ROOT / "tokenizer" / "tokenizer.model")


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8-sig", newline="") as f:  # the official files carry a BOM
        csv.writer(f).writerows([header, *rows])
    return path


def ceval_tree(root: Path, answers: dict[str, str], dev_rows: int = 5) -> Path:
    """dev/ val/ test/ with one file per subject; val's answers are the letters given per subject."""
    for subject, letters in answers.items():
        dev = [[i, f"{subject} 例题{i}", *OPTIONS, "ABCD"[i % 4], "解析"] for i in range(dev_rows)]
        write_csv(root / "dev" / f"{subject}_dev.csv", ["id", "question", "A", "B", "C", "D", "answer", "explanation"],
                  dev)
        val = [[i, f"{subject} 题目{i}\n（第二行）", *OPTIONS, a] for i, a in enumerate(letters)]
        write_csv(root / "val" / f"{subject}_val.csv", ["id", "question", "A", "B", "C", "D", "answer"], val)
        test = [[i, f"{subject} 考题{i}", *OPTIONS] for i in range(len(letters))]
        write_csv(root / "test" / f"{subject}_test.csv", ["id", "question", "A", "B", "C", "D"], test)
    return root


def cmmlu_tree(root: Path, answers: dict[str, str]) -> Path:
    """dev/ test/ with <subject>.csv: an unnamed index column, then Question, A-D, Answer."""
    for subject, letters in answers.items():
        for split, rows in [("dev", "ABCDA"), ("test", letters)]:
            write_csv(root / split / f"{subject}.csv", ["", "Question", "A", "B", "C", "D", "Answer"],
                      [[i, f"{subject} {split}{i}", *OPTIONS, a] for i, a in enumerate(rows)])
    return root


class Rigged(nn.Module):
    """Same logits at every position whatever the context: the tokens of `favoured` get +5."""

    def __init__(self, vocab_size: int, favoured: list[int]):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, block_size=512)
        self.logits = nn.Parameter(torch.zeros(vocab_size))
        self.logits.data[favoured] = 5.0

    def forward(self, idx, targets, reduction="mean"):
        logits = self.logits.expand(*idx.shape, -1)
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
        return logits, nll.view(targets.shape)


def run_main(monkeypatch, capsys, model_dir: Path, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["eval.py", "--model", str(model_dir), "--device", "cpu", *args])
    code = 0
    try:
        nanozh_eval.main()
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok) -> Path:
    import shutil
    path = tmp_path_factory.mktemp("bench") / "m"
    torch.manual_seed(0)
    Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, n_embd=32,
                            block_size=128)).save(path)
    shutil.copy(ROOT / "tokenizer" / "tokenizer.model", path / "tokenizer.model")
    return path


# -----------------------------------------------------------------------------
# scoring


@pytest.mark.parametrize("benchmark", ["ceval", "cmmlu"])
def test_a_model_rigged_to_prefer_b_scores_exactly_the_planted_fraction(tmp_path, tok, benchmark):
    # 3 of 4 answers B in a STEM subject, 1 of 4 in a humanities one: the model answers B everywhere,
    # by letter (it prefers the letter's token) and by text (it prefers 乙方's tokens too)
    answers = {"computer_network" if benchmark == "ceval" else "anatomy": "BBBA",
               "law" if benchmark == "ceval" else "arts": "CBDA"}
    tree = (ceval_tree if benchmark == "ceval" else cmmlu_tree)(tmp_path / benchmark, answers)
    model = Rigged(tok.vocab_size, tok.encode("B") + tok.encode(OPTIONS[1]))
    split = "val" if benchmark == "ceval" else "test"
    for raw, shots in [(True, 0), (False, 2)]:
        questions, dev = benchmarks.read_benchmark(benchmark, str(tree), split, [], shots)
        picks = nanozh_eval.benchmark_picks(model, tok, benchmark, questions, dev, raw=raw)
        assert picks == {"letter": [1] * 8, "text": [1] * 8}
        report = nanozh_eval.benchmark_report(benchmark, questions, picks)
        assert (report["letter"], report["text"], report["questions"], report["chance"]) == (0.5, 0.5, 8, 0.25)
        assert {c: (r["letter"], r["questions"]) for c, r in report["categories"].items()} == \
            {"STEM": (0.75, 4), "人文": (0.25, 4)}
        assert [r["text"] for r in report["subjects"].values()] == [0.75, 0.25]


def test_letter_and_text_scorings_differ_where_the_model_knows_only_the_text(tmp_path, tok):
    tree = ceval_tree(tmp_path / "ceval", {"logic": "CCCC"})
    model = Rigged(tok.vocab_size, tok.encode(OPTIONS[2]))  # likes 丙方, has no opinion on letters
    questions, dev = benchmarks.read_benchmark("ceval", str(tree), "val", [], 0)
    report = nanozh_eval.benchmark_report("ceval", questions, nanozh_eval.benchmark_picks(model, tok, "ceval",
                                                                                        questions, dev))
    assert report["text"] == 1.0 and report["letter"] == 0.0  # letters all tie: the first, A, is picked


def test_cli_prints_a_table_and_json_and_a_subject_filter(monkeypatch, capsys, tmp_path, model_dir):
    tree = cmmlu_tree(tmp_path / "cmmlu", {"agronomy": "ABCD", "virology": "AABB", "sociology": "DD"})
    code, out, err = run_main(monkeypatch, capsys, model_dir, "--cmmlu", str(tree), "--subjects", "virology,agronomy",
                              "--shots", "1")
    assert code == 0, err
    result = json.loads(out)
    assert list(result["subjects"]) == ["agronomy", "virology"] and result["questions"] == 8
    assert {result["subjects"]["agronomy"]["category"], result["subjects"]["virology"]["category"]} == {"其他", "STEM"}
    assert set(result["scorings"]) == {"letter", "text"} and result["shots"] == 1
    table = err.splitlines()
    assert any(line.startswith("virology") for line in table) and table[-1].startswith("overall")


# -----------------------------------------------------------------------------
# few-shot prompts


@pytest.mark.parametrize("shots", [0, 1, 3, 5])
def test_few_shot_prompts_hold_exactly_k_dev_examples_of_the_same_subject(tmp_path, shots):
    tree = ceval_tree(tmp_path / "ceval", {"law": "AB", "logic": "CD"})
    questions, dev = benchmarks.read_benchmark("ceval", str(tree), "val", [], shots)
    for q in questions:
        for by_text in (False, True):
            text, answers = benchmarks.prompt("ceval", q, dev.get(q.subject, []), by_text)
            assert text.count("答案：") == shots + 1 and text.endswith("答案：")
            assert [i for i in range(5) if f"{q.subject} 例题{i}" in text] == list(range(shots))
            other = "logic" if q.subject == "law" else "law"
            assert other not in text
            assert answers == (OPTIONS if by_text else list("ABCD"))
            assert text.startswith(f"以下是中国关于{benchmarks.subject_info('ceval', q.subject)[0]}考试的单项选择题")
            # a solved example ends in its answer, written the way the question is scored
            for s in dev.get(q.subject, []):
                answer = s.choices[s.answer] if by_text else "ABCD"[s.answer]
                assert f"{s.question}\nA. 甲方\nB. 乙方\nC. 丙方\nD. 丁方\n答案：{answer}\n\n" in text


def test_more_shots_than_dev_examples_is_a_one_line_error(monkeypatch, capsys, tmp_path, model_dir):
    tree = ceval_tree(tmp_path / "ceval", {"law": "AB"}, dev_rows=3)
    code, _, err = run_main(monkeypatch, capsys, model_dir, "--ceval", str(tree), "--shots", "4")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"nanozh: {tree / 'dev' / 'law_dev.csv'}: 3 questions, --shots 4 needs that many")


# -----------------------------------------------------------------------------
# C-Eval test: predictions in the submission JSON


def test_ceval_test_split_writes_the_submission_json(monkeypatch, capsys, tmp_path, model_dir):
    tree = ceval_tree(tmp_path / "ceval", {"law": "ABC", "physician": "AB"})
    code, _, err = run_main(monkeypatch, capsys, model_dir, "--ceval", str(tree), "--split", "test")
    assert code == 1 and "has no answers to score against (pass --out" in err
    out = tmp_path / "submission.json"
    code, stdout, err = run_main(monkeypatch, capsys, model_dir, "--ceval", str(tree), "--split", "test",
                                 "--out", str(out))
    assert code == 0, err
    submission = json.loads(out.read_text(encoding="utf-8"))
    assert {s: sorted(p) for s, p in submission.items()} == {"law": ["0", "1", "2"], "physician": ["0", "1"]}
    assert all(letter in "ABCD" for p in submission.values() for letter in p.values())
    assert json.loads(stdout)["predictions"] == str(out)


# -----------------------------------------------------------------------------
# malformed files


HEADER = ["id", "question", "A", "B", "C", "D", "answer"]


@pytest.mark.parametrize("bad, what", [
    ([1, "问", "a", "b", "c", "d"], "6 fields, the header has 7"),
    ([1, "问", "a", "", "c", "d", "A"], "empty question or option"),
    ([1, " ", "a", "b", "c", "d", "A"], "empty question or option"),
    ([1, "问", "a", "b", "c", "d", "E"], "answer 'E' is not one of A, B, C, D"),
    ([1, "问", "a", "b", "c", "d", "AB"], "answer 'AB' is not one of A, B, C, D"),
    ([1, "问", "a", "b", "c", "d", ""], "answer '' is not one of A, B, C, D"),
])
def test_a_malformed_row_names_file_and_line(monkeypatch, capsys, tmp_path, model_dir, bad, what):
    tree = ceval_tree(tmp_path / "ceval", {"law": "AB"})
    # the good row's question spans two lines: the bad row starts on line 4
    path = write_csv(tree / "val" / "law_val.csv", HEADER, [[0, "第一行\n第二行", "a", "b", "c", "d", "B"], bad])
    code, _, err = run_main(monkeypatch, capsys, model_dir, "--ceval", str(tree))
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"nanozh: {path}:4: {what}")


def test_missing_columns_and_folders_and_subjects_are_one_line_errors(monkeypatch, capsys, tmp_path, model_dir):
    tree = ceval_tree(tmp_path / "ceval", {"law": "AB"})
    path = write_csv(tree / "val" / "law_val.csv", ["id", "question", "A", "B", "C", "answer"], [[0, "问", 1, 2, 3, "A"]])
    _, _, err = run_main(monkeypatch, capsys, model_dir, "--ceval", str(tree))
    assert err.startswith(f"nanozh: {path}:1: no column d in the header")
    _, _, err = run_main(monkeypatch, capsys, model_dir, "--cmmlu", str(tree / "dev"))  # one level too deep
    assert err.startswith(f"nanozh: {tree / 'dev'}: no test/ folder")
    _, _, err = run_main(monkeypatch, capsys, model_dir, "--ceval", str(tree), "--subjects", "law,poetry")
    assert err.startswith(f"nanozh: {tree / 'val'}: no subject poetry (have: law)")
    _, _, err = run_main(monkeypatch, capsys, model_dir, "--ceval", str(tree), "--split", "train")
    assert err.startswith("nanozh: --split: ceval has no split 'train' (one of dev, val, test)")
