"""Specification of sample.py: reproducible sampling, greedy output equal to Transformer.generate,
multi-turn chat through stdin, streaming that never prints a broken character, and one-line
errors for prompts and model directories a user gets wrong.

The model is a tiny random Transformer over the shipped tokenizer's vocabulary, saved as a model
directory with tokenizer.model beside it, as training leaves it."""

import io
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sample
from model import ModelConfig, Transformer, apply_repetition_penalty, load, sample_next
from tokenizer.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tokenizer" / "tokenizer.model"
CONTEXT = 64


def save_model_dir(path: Path, vocab_size: int, tokenizer: Path | None = TOKENIZER) -> Path:
    torch.manual_seed(0)
    # init_std 0.5: at the usual 0.02 a random model repeats one token whatever it is given
    config = ModelConfig(vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                         block_size=CONTEXT, init_std=0.5)
    Transformer(config).save(path)
    if tokenizer is not None:
        shutil.copy(tokenizer, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok) -> Path:
    return save_model_dir(tmp_path_factory.mktemp("model"), tok.vocab_size)


def run_main(monkeypatch, capsys, *args: str) -> tuple[str, str]:
    """sample.py's main in this process (no torch import per run); (stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["sample.py", *args])
    sample.main()
    return capsys.readouterr()


def run_error(monkeypatch, capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit:
        run_main(monkeypatch, capsys, *args)
    assert exit.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nanozh: ")
    return err.strip()


# -----------------------------------------------------------------------------
# sampling


def test_same_seed_gives_same_text_and_another_seed_other_text(monkeypatch, capsys, model_dir):
    args = ["--model", str(model_dir), "--prompt", "讲个故事", "--temperature", "1.0", "--top_k", "0",
            "--top_p", "1.0", "--max_new_tokens", "24", "--quiet"]
    a = run_main(monkeypatch, capsys, *args, "--seed", "1").out
    b = run_main(monkeypatch, capsys, *args, "--seed", "1").out
    c = run_main(monkeypatch, capsys, *args, "--seed", "2").out
    assert a == b
    assert a != c


def test_greedy_prints_what_transformer_generate_returns(monkeypatch, capsys, model_dir, tok):
    out = run_main(monkeypatch, capsys, "--model", str(model_dir), "--prompt", "你好", "--temperature", "0",
                   "--max_new_tokens", "20", "--quiet").out
    model, _ = load(str(model_dir))
    ids = tok.render_chat([{"role": "user", "content": "你好"}], add_generation_prompt=True)[0]
    new = model.generate(torch.tensor([ids]), 20, temperature=0)[0, len(ids):].tolist()
    stops = [k for k, t in enumerate(new) if t in (tok.im_end_id, tok.eos_id)]
    assert out == tok.decode(new[: stops[0] if stops else None]) + "\n"


def test_raw_mode_continues_the_text_after_an_eos(monkeypatch, capsys, model_dir, tok):
    out = run_main(monkeypatch, capsys, "--model", str(model_dir), "--prompt", "从前有座山", "--raw",
                   "--temperature", "0", "--max_new_tokens", "10", "--quiet").out
    model, _ = load(str(model_dir))
    ids = [tok.eos_id] + tok.encode("从前有座山")
    new = model.generate(torch.tensor([ids]), 10, temperature=0)[0, len(ids):].tolist()
    stops = [k for k, t in enumerate(new) if t in (tok.im_end_id, tok.eos_id)]
    assert out == "从前有座山" + tok.decode(new[: stops[0] if stops else None]) + "\n"


def test_prompt_file_answers_every_line(monkeypatch, capsys, model_dir, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "你好"}\n\n{"prompt": "再见", "id": 7}\n', encoding="utf-8")
    out, err = run_main(monkeypatch, capsys, "--model", str(model_dir), "--prompt_file", str(path),
                        "--temperature", "0", "--max_new_tokens", "5")
    assert "> 你好\n" in out and "> 再见\n" in out
    assert re.fullmatch(r"\d+ tokens in [\d.]+s, [\d.]+ tokens/s \(prompt \d+ tokens\)\n", err)


def test_compiled_model_answers_a_prompt_file_as_the_eager_model_does(monkeypatch, capsys, model_dir, tmp_path):
    # prompts of three lengths and 30 decode steps: one compiled graph must serve every prefill
    # length and every cache length (dynamic shapes), giving the eager model's greedy tokens
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "你好"}\n{"prompt": "请介绍一下长城的历史"}\n{"prompt": "从前有座山，山里有座庙"}\n',
                    encoding="utf-8")
    args = ["--model", str(model_dir), "--prompt_file", str(path), "--temperature", "0", "--max_new_tokens", "30",
            "--device", "cpu", "--quiet"]
    eager = run_main(monkeypatch, capsys, *args).out
    torch._dynamo.reset()  # compile here, not reuse what another test left in this process
    torch._dynamo.utils.counters.clear()
    compiled = run_main(monkeypatch, capsys, *args, "--compile").out
    assert compiled == eager
    # it really ran compiled, and with a graph or two in all, not one per length (each would
    # compile again, and past torch's limit of 8 fall back to eager without a word)
    assert 1 <= torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3


def test_compile_without_a_cpp_compiler_is_a_one_line_error(model_dir, tmp_path):
    # inductor compiles C++ on the CPU; an empty cache dir, so that nothing compiled before is reused
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(model_dir), "--prompt", "你好",
                           "--max_new_tokens", "4", "--device", "cpu", "--compile"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("nanozh: --compile: torch.compile failed (")
    assert "run without --compile" in proc.stderr


# -----------------------------------------------------------------------------
# the sampling filters (model.sample_next, model.apply_repetition_penalty)

# one row of probabilities, most likely first after sorting: token 5 (.30), 2 (.25), 7 (.15), 0 (.12), ...
PROBS = torch.tensor([0.12, 0.03, 0.25, 0.05, 0.08, 0.30, 0.02, 0.15])
BY_RANK = [5, 2, 7, 0, 4, 3, 1, 6]
DRAWS = 20000


def draw(top_k=None, top_p=None, temperature=1.0, logits=None) -> torch.Tensor:
    """How often each token is drawn, as a fraction of DRAWS draws from one fixed logits row."""
    logits = PROBS.log() if logits is None else logits
    rows = logits.expand(DRAWS, -1)
    tokens = sample_next(rows, temperature, top_k, top_p, torch.Generator().manual_seed(0))
    return torch.bincount(tokens, minlength=len(logits)) / DRAWS


def renormalised(keep: list[int]) -> torch.Tensor:
    p = torch.zeros_like(PROBS)
    p[keep] = PROBS[keep] / PROBS[keep].sum()
    return p


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_top_k_never_emits_a_token_outside_the_k_best(k):
    freq = draw(top_k=k)
    assert set(freq.nonzero().flatten().tolist()) == set(BY_RANK[:k])
    assert torch.allclose(freq, renormalised(BY_RANK[:k]), atol=0.015)  # and in proportion


def test_top_k_keeps_exactly_k_tokens_when_several_tie_with_the_k_th():
    logits = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 0.0])
    freq = draw(top_k=2, logits=logits)
    assert freq[1] > 0.5 and (freq > 0).sum() == 2  # the best and one of the three tied at 2.0


@pytest.mark.parametrize("top_p, nucleus", [
    (0.2, 1),    # below the first token's .30: the most likely token alone
    (0.5, 2),    # .30 + .25 = .55 reaches it
    (0.6, 3),    # .55 does not, .70 does
    (0.85, 5),   # .82 does not, .90 does
])
def test_top_p_never_emits_a_token_outside_the_nucleus(top_p, nucleus):
    freq = draw(top_p=top_p)
    assert set(freq.nonzero().flatten().tolist()) == set(BY_RANK[:nucleus])
    assert torch.allclose(freq, renormalised(BY_RANK[:nucleus]), atol=0.015)


def test_top_p_applies_to_what_top_k_left():
    # the top 2 renormalised are .30/.55 = .55 and .45: the first alone reaches 0.5, where from the
    # whole row (.30, then .55) it takes two
    assert draw(top_k=2, top_p=0.5).nonzero().flatten().tolist() == [BY_RANK[0]]
    assert set(draw(top_p=0.5).nonzero().flatten().tolist()) == set(BY_RANK[:2])


def test_repetition_penalty_divides_a_seen_positive_logit_and_multiplies_a_negative_one():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 0.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    penalised = apply_repetition_penalty(logits, seen, 2.0)
    assert penalised.tolist() == [[1.0, -2.0, 0.5, -0.5, 0.0]]  # unseen tokens keep their logits
    # the probabilities that follow, written out
    e = [math.exp(v) for v in (1.0, -2.0, 0.5, -0.5, 0.0)]
    expected = torch.tensor([[v / sum(e) for v in e]])
    assert torch.allclose(torch.softmax(penalised, dim=-1), expected, atol=1e-7)
    after, before = torch.softmax(penalised, dim=-1), torch.softmax(logits, dim=-1)
    assert after[0, 0] < before[0, 0] and after[0, 1] < before[0, 1]  # both repeats less likely
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_generation_penalises_tokens_of_the_prompt_and_those_it_produced():
    """A model whose next-token logits never change: greedy decoding repeats its favourite, unless
    the penalty pushes a seen token below the next unseen one."""
    model = Transformer(ModelConfig(vocab_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, block_size=32))
    fixed = torch.zeros(16)
    fixed[[3, 5, 9]] = torch.tensor([2.0, 1.5, 1.2])
    model.forward = lambda idx, cache=None: (fixed.expand(*idx.shape, -1), None)
    prompt = torch.tensor([[1, 9]])
    assert model.generate(prompt, 3, temperature=0, use_cache=False)[0, 2:].tolist() == [3, 3, 3]
    # penalty 2, applied once per seen token however often it repeats: 9 was in the prompt (0.6);
    # 3 is produced first (2.0, then 1.0), then 5 (1.5, then 0.75), then 3 again, for good
    out = model.generate(prompt, 4, temperature=0, repetition_penalty=2.0, use_cache=False)
    assert out[0, 2:].tolist() == [3, 5, 3, 3]


# -----------------------------------------------------------------------------
# chat


def summaries(stderr: str) -> list[int]:
    """The prompt length of each reply, from the summary lines."""
    return [int(n) for n in re.findall(r"\(prompt (\d+) tokens\)", stderr)]


def test_chat_through_stdin_remembers_the_first_turn_until_reset(model_dir, tok):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(model_dir), "--chat",
                           "--temperature", "0", "--max_new_tokens", "6", "--device", "cpu"],
                          input="你好\n再来一句\n/reset\n你好\n/exit\n这行不会被读到\n", capture_output=True,
                          text=True, encoding="utf-8", env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # what the model answers first, greedy, computed independently of sample.py
    model, _ = load(str(model_dir))
    first = [{"role": "user", "content": "你好"}]
    ids = tok.render_chat(first, add_generation_prompt=True)[0]
    new = model.generate(torch.tensor([ids]), 6, temperature=0, stop_ids=[tok.im_end_id, tok.eos_id])[0, len(ids):]
    reply = tok.decode([t for t in new.tolist() if t not in (tok.im_end_id, tok.eos_id)])
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "再来一句"}]
    assert summaries(proc.stderr) == [len(ids), len(tok.render_chat(second, add_generation_prompt=True)[0]), len(ids)]
    assert "(conversation reset)" in proc.stderr


def test_chat_drops_the_oldest_turns_with_a_notice_when_the_context_fills(monkeypatch, capsys, model_dir):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"第{i}个问题是什么\n" for i in range(6))))
    _, err = run_main(monkeypatch, capsys, "--model", str(model_dir), "--chat", "--temperature", "0",
                      "--max_new_tokens", "8")
    lengths = summaries(err)
    assert len(lengths) == 6
    assert "oldest exchange" in err
    assert max(lengths) + 8 <= CONTEXT  # every prompt still left room for the reply


# -----------------------------------------------------------------------------
# streaming


def test_streaming_prints_emoji_and_rare_cjk_whole(monkeypatch, capsys, model_dir, tok):
    text = "好😀，𠀀!"
    ids = tok.encode(text)
    assert sum(tok.sp.is_byte(i) for i in ids) >= 8  # 😀 and 𠀀 arrive as four byte pieces each

    def fake_stream(self, idx, max_new_tokens, **kwargs):  # the model "says" exactly these ids
        for t in ids + [tok.im_end_id, 123]:
            yield torch.tensor([t])

    monkeypatch.setattr(Transformer, "generate_stream", fake_stream)
    model, _ = load(str(model_dir))
    chunks = []

    class Recorder:
        def write(self, s: str) -> None:
            chunks.append(s)

        def flush(self) -> None:
            pass

    args = sample.argparse.Namespace(max_new_tokens=50, temperature=0, top_k=None, top_p=None, repetition_penalty=1.0)
    reply, n = sample.stream_reply(model, tok, [tok.eos_id], args, torch.Generator(), out=Recorder())
    assert reply == "".join(chunks) == text
    assert n == len(ids) + 1  # the stop token counts as generated, the token after it is never read
    assert not any("\ufffd" in c for c in chunks)
    assert "😀" in chunks and "𠀀" in chunks  # each printed at once when its last byte arrives
    out = run_main(monkeypatch, capsys, "--model", str(model_dir), "--prompt", "hi", "--quiet").out
    assert out == text + "\n"


# -----------------------------------------------------------------------------
# errors


def test_prompt_longer_than_the_context_is_a_one_line_error(monkeypatch, capsys, model_dir):
    err = run_error(monkeypatch, capsys, "--model", str(model_dir), "--prompt", "长" * 200)
    assert err.startswith("nanozh: --prompt: prompt is ")
    assert f"the model's context is {CONTEXT}" in err


def test_prompt_file_line_too_long_or_malformed_names_the_line(monkeypatch, capsys, model_dir, tmp_path):
    long = tmp_path / "long.txt"
    long.write_text("短\n" + "长" * 200 + "\n", encoding="utf-8")
    assert run_error(monkeypatch, capsys, "--model", str(model_dir), "--prompt_file", str(long)).startswith(
        f"nanozh: {long}:2: prompt is ")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "好"}\n{"prompt": "坏"\n', encoding="utf-8")
    assert run_error(monkeypatch, capsys, "--model", str(model_dir), "--prompt_file", str(bad)).startswith(
        f"nanozh: {bad}:2: malformed JSON")
    bad.write_text('{"question": "好"}\n', encoding="utf-8")
    assert run_error(monkeypatch, capsys, "--model", str(model_dir), "--prompt_file", str(bad)).startswith(
        f"nanozh: {bad}:1: no \"prompt\" field (fields: question)")


def test_model_directory_without_tokenizer_is_a_one_line_error(monkeypatch, capsys, tmp_path, tok):
    bare = save_model_dir(tmp_path / "bare", tok.vocab_size, tokenizer=None)
    err = run_error(monkeypatch, capsys, "--model", str(bare), "--prompt", "你好")
    assert err.startswith(f"nanozh: {bare / 'tokenizer.model'}: missing")


def test_tokenizer_that_does_not_match_the_model_is_a_one_line_error(monkeypatch, capsys, tmp_path, tok):
    other = save_model_dir(tmp_path / "other", 1000)
    err = run_error(monkeypatch, capsys, "--model", str(other), "--prompt", "你好")
    assert f"tokenizer has {tok.vocab_size} tokens but the model was trained with 1000" in err
    (other / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    err = run_error(monkeypatch, capsys, "--model", str(other), "--prompt", "你好")
    assert err.startswith(f"nanozh: {other / 'tokenizer.model'}: not a valid sentencepiece model")
