"""Specification of sample.py: reproducible sampling, greedy output equal to Transformer.generate,
multi-turn chat through stdin, streaming that never prints a broken character, and one-line
errors for prompts and model directories a user gets wrong.

The model is a tiny random Transformer over the shipped tokenizer's vocabulary, saved as a model
directory with tokenizer.model beside it, as training leaves it."""

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sample
from model import ModelConfig, Transformer
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
    model, _ = sample.load(str(model_dir))
    ids = tok.render_chat([{"role": "user", "content": "你好"}], add_generation_prompt=True)[0]
    new = model.generate(torch.tensor([ids]), 20, temperature=0)[0, len(ids):].tolist()
    stops = [k for k, t in enumerate(new) if t in (tok.im_end_id, tok.eos_id)]
    assert out == tok.decode(new[: stops[0] if stops else None]) + "\n"


def test_raw_mode_continues_the_text_after_an_eos(monkeypatch, capsys, model_dir, tok):
    out = run_main(monkeypatch, capsys, "--model", str(model_dir), "--prompt", "从前有座山", "--raw",
                   "--temperature", "0", "--max_new_tokens", "10", "--quiet").out
    model, _ = sample.load(str(model_dir))
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
    model, _ = sample.load(str(model_dir))
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
    model, _ = sample.load(str(model_dir))
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
