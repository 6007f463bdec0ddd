"""Specification of eval.py: the window/stride scorer that training's validation also uses, bits per
character, batched chat answers, multiple choice by log-likelihood, and file:line errors for
malformed prompt files."""

import json
import math
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import eval as nanozh_eval
from errors import NanozhError
from eval import _windows, answer_prompts, bpc_of_text, mc_accuracy, nll_of_tokens, read_mc
from model import ModelConfig, Transformer, load_model
from tokenizer.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tokenizer" / "tokenizer.model"
CORPUS = ROOT / "data" / "corpus"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(TOKENIZER)


def tiny_transformer(vocab_size: int, block_size: int = 64, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    config = dict(vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, block_size=block_size)
    return Transformer(ModelConfig(**{**config, **overrides}))


class LastK(nn.Module):
    """A stand-in language model whose prediction at position t depends on tokens t-k+1..t only:
    scoring with windows whose every scored token has k-1 tokens of history must then equal
    scoring the whole sequence in one pass, whatever the window bookkeeping."""

    def __init__(self, vocab_size: int, k: int):
        super().__init__()
        self.lags = nn.ModuleList(nn.Embedding(vocab_size, vocab_size) for _ in range(k))

    def forward(self, idx, targets, reduction="mean"):
        logits = sum(F.pad(lag(idx), (0, 0, j, 0))[:, : idx.shape[1]] for j, lag in enumerate(self.lags))
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
        return logits, nll.view(targets.shape)


def one_pass_nll(model, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return model(tokens[None, :-1], tokens[None, 1:], reduction="none")[1].sum().item()


# -----------------------------------------------------------------------------
# the window/stride scorer


def test_windows_score_every_token_exactly_once():
    for n in [1, 2, 3, 10, 64, 65, 66, 200, 257]:
        for context, stride in [(1, 1), (8, 1), (8, 3), (8, 8), (64, 32), (300, 150)]:
            scored = [p for start, first in _windows(n, context, stride)
                      for p in range(first, start + min(context, n - 1) + 1)]
            assert scored == list(range(1, n)), (n, context, stride)


def test_window_stride_scoring_equals_one_pass_when_each_window_has_enough_history():
    torch.manual_seed(0)
    model, tokens = LastK(50, k=5), torch.randint(0, 50, (300,))
    expected = one_pass_nll(model, tokens)
    for context, stride in [(16, 12), (32, 16), (64, 64 - 4), (299, 7)]:  # context - stride >= k - 1
        nll, count = nll_of_tokens(model, tokens, context, stride, batch_size=3)
        assert count == 299
        assert nll == pytest.approx(expected, rel=1e-6)
    nll, _ = nll_of_tokens(model, tokens, 16, 16)  # windows that start with no history differ
    assert nll != pytest.approx(expected, rel=1e-6)


def test_a_document_within_the_context_is_scored_in_one_pass_and_train_mode_restored():
    model, tokens = tiny_transformer(100, block_size=128), torch.randint(0, 100, (120,))
    expected = one_pass_nll(model.eval(), tokens)
    nll, count = nll_of_tokens(model.train(), tokens, context=128, stride=32)
    assert model.training
    assert count == 119
    assert nll == pytest.approx(expected, rel=1e-6)


def test_uniform_logits_over_a_padded_vocab_give_ln_vocab_per_token():
    model = tiny_transformer(100)  # padded to 128 rows: the 28 extra ones must get no mass
    assert model.config.padded_vocab_size == 128
    for p in model.parameters():
        nn.init.zeros_(p)
    nll, count = nll_of_tokens(model, torch.randint(0, 100, (150,)), context=64, stride=32)
    assert count == 149
    assert nll == pytest.approx(149 * math.log(100), rel=1e-6)


# -----------------------------------------------------------------------------
# --text: bits per character


def save_model_dir(model: Transformer, path: Path) -> Path:
    model.save(path)
    shutil.copy(TOKENIZER, path / "tokenizer.model")
    return path


def test_uniform_model_gives_log2_vocab_bits_per_token(monkeypatch, capsys, tmp_path, tok):
    model = tiny_transformer(tok.vocab_size)
    for p in model.parameters():
        nn.init.zeros_(p)
    docs = ["春眠不觉晓，处处闻啼鸟。" * 20, "Hello, 世界 😀\n第二行", "短"]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["eval.py", "--model", str(save_model_dir(model, tmp_path / "m")),
                                      "--text", str(tmp_path / "docs.jsonl"), "--device", "cpu"])
    nanozh_eval.main()
    result = json.loads(capsys.readouterr().out)
    tokens = sum(len(tok.encode(d)) for d in docs)
    chars = sum(len(d) for d in docs)
    assert (result["tokens"], result["chars"], result["docs"]) == (tokens, chars, 3)
    assert result["bpc"] == pytest.approx(math.log2(tok.vocab_size) * tokens / chars, rel=1e-6)
    assert result["nll"] == pytest.approx(tokens * math.log(tok.vocab_size), rel=1e-6)


def test_bpc_on_bundled_heldout_text_drops_after_a_little_pretraining(pretrained, tmp_path, tok):
    """The tiny preset after a short run of train_pretrain.py (the shared `pretrained` model) against
    the same preset at its random initialisation."""
    # the start of the first held-out documents (a mix of sources) keeps the scoring quick
    heldout = pq.read_table(CORPUS / "heldout.parquet").column("text").to_pylist()[:8]
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps({"text": d[:800]}) + "\n" for d in heldout))
    trained = load_model(pretrained)
    torch.manual_seed(0)
    untrained = Transformer(trained.config)
    before, after = (bpc_of_text(m, tok, [str(tmp_path / "heldout.jsonl")])["bpc"] for m in (untrained, trained))
    assert after < 0.9 * before, (before, after)


# -----------------------------------------------------------------------------
# --chat_prompts


def test_batched_greedy_answers_equal_one_prompt_at_a_time(tok):
    model = tiny_transformer(tok.vocab_size, init_std=0.5)  # sharp enough to answer each prompt differently
    records = [(f"f:{i}", {"prompt": p, "id": i}) for i, p in enumerate(["你好", "再见", "你是谁", "谢谢", "好"])]
    batched = answer_prompts(model, tok, records, max_new_tokens=12, batch_size=4)
    single = answer_prompts(model, tok, records, max_new_tokens=12, batch_size=1)
    assert batched == single
    assert [a["id"] for a in batched] == [0, 1, 2, 3, 4]
    assert len({a["answer"] for a in batched}) > 1
    assert all(a["tokens"] == len(tok.encode(a["answer"])) or a["finish"] == "stop" for a in batched)


def test_chat_prompts_writes_one_answer_line_per_prompt(monkeypatch, capsys, tmp_path, tok):
    model_dir = save_model_dir(tiny_transformer(tok.vocab_size), tmp_path / "m")
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
    prompts.write_text('{"prompt": "你好", "ref": "x"}\n{"prompt": "天空是什么颜色"}\n', encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["eval.py", "--model", str(model_dir), "--chat_prompts", str(prompts),
                                      "--out", str(out), "--max_new_tokens", "4", "--device", "cpu"])
    nanozh_eval.main()
    summary = json.loads(capsys.readouterr().out)
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in lines] == ["你好", "天空是什么颜色"] and lines[0]["ref"] == "x"
    assert all({"answer", "tokens", "finish"} <= r.keys() for r in lines)
    assert summary["prompts"] == 2 and summary["tokens"] == sum(r["tokens"] for r in lines)


# -----------------------------------------------------------------------------
# --mc


class Planted(nn.Module):
    """Same logits at every position, favouring the tokens of one planted answer."""

    def __init__(self, vocab_size: int, favoured: list[int]):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(vocab_size))
        self.logits.data[favoured] = 5.0

    def forward(self, idx, targets, reduction="mean"):
        logits = self.logits.expand(*idx.shape, -1)
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
        return logits, nll.view(targets.shape)


def test_mc_picks_the_planted_answer_wherever_it_is(tmp_path, tok):
    path = tmp_path / "mc.jsonl"
    path.write_text(
        json.dumps({"question": "哪一个是对的？", "choices": ["错的选项", "长城在北京", "不对"], "answer": "B"}) + "\n"
        + json.dumps({"question": "再选一次", "choices": {"A": "长城在北京", "B": "别的", "C": "也不对", "D": "错"},
                      "answer": "A"}) + "\n", encoding="utf-8")
    model = Planted(tok.vocab_size, tok.encode("长城在北京"))
    model.config = ModelConfig(vocab_size=tok.vocab_size, block_size=64)
    for raw in (False, True):
        assert mc_accuracy(model, tok, read_mc(str(path)), raw=raw)["accuracy"] == 1.0
    wrong = path.read_text(encoding="utf-8").replace('"answer": "B"', '"answer": "C"')
    path.write_text(wrong, encoding="utf-8")
    assert mc_accuracy(model, tok, read_mc(str(path)))["accuracy"] == 0.5


# -----------------------------------------------------------------------------
# malformed files


def eval_error(monkeypatch, capsys, tmp_path, tok, *args: str) -> str:
    model_dir = tmp_path / "m"
    if not model_dir.exists():
        save_model_dir(tiny_transformer(tok.vocab_size), model_dir)
    monkeypatch.setattr(sys, "argv", ["eval.py", "--model", str(model_dir), "--device", "cpu", *args])
    with pytest.raises(SystemExit) as exit:
        nanozh_eval.main()
    assert exit.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    return err.strip()


@pytest.mark.parametrize("content, line, what", [
    ('{"prompt": "好"}\n{"prompt": "坏",}\n', 2, "malformed JSON"),
    ('{"prompt": "好"}\n\n{"question": "?"}\n', 3, 'no "prompt" field (fields: question)'),
    ('["好"]\n', 1, 'no "prompt" field (a JSON list)'),
    ('{"prompt": ""}\n', 1, '"prompt" is \'\', not a non-empty string'),
])
def test_malformed_chat_prompts_name_file_and_line(monkeypatch, capsys, tmp_path, tok, content, line, what):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content, encoding="utf-8")
    out = tmp_path / "a.jsonl"
    err = eval_error(monkeypatch, capsys, tmp_path, tok, "--chat_prompts", str(path), "--out", str(out))
    assert err.startswith(f"nanozh: {path}:{line}: {what}")
    assert not out.exists()


@pytest.mark.parametrize("record, what", [
    ({"question": "?", "choices": ["a", "b"]}, "needs fields question, choices, answer"),
    ({"question": "?", "choices": ["a", "b"], "answer": "C"}, "answer 'C' is not one of the letters AB"),
    ({"question": "?", "choices": ["a"], "answer": "A"}, "choices at least two non-empty strings"),
    ({"question": "?", "choices": ["a", ""], "answer": "A"}, "choices at least two non-empty strings"),
])
def test_malformed_mc_files_name_file_and_line(monkeypatch, capsys, tmp_path, tok, record, what):
    path = tmp_path / "mc.jsonl"
    good = {"question": "?", "choices": ["a", "b"], "answer": "A"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    assert what in eval_error(monkeypatch, capsys, tmp_path, tok, "--mc", str(path))
    assert eval_error(monkeypatch, capsys, tmp_path, tok, "--mc", str(path)).startswith(f"nanozh: {path}:2: ")


@pytest.mark.parametrize("answer", ["", " ", "BC", "ABCD", "E", 1, None, ["A"]])
def test_mc_answer_that_is_not_exactly_one_choice_letter_names_file_and_line(tmp_path, answer):
    path = tmp_path / "mc.jsonl"
    good = {"question": "?", "choices": ["a", "b", "c", "d"], "answer": "A"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "answer": answer}) + "\n", encoding="utf-8")
    with pytest.raises(NanozhError) as e:
        read_mc(str(path))
    assert str(e.value).startswith(f"nanozh: {path}:2: answer {answer!r} is not one of the letters ABCD")


def test_mc_answer_letter_may_be_lower_case_or_padded(tmp_path):
    path = tmp_path / "mc.jsonl"
    lines = [{"question": "?", "choices": ["a", "b", "c", "d"], "answer": a} for a in ["A", " b", "c\n", "D"]]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    assert [answer for _, _, _, answer in read_mc(str(path))] == [0, 1, 2, 3]
