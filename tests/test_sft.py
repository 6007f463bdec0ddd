"""train_sft.py: only what the assistant writes carries loss; fine-tuning teaches an answer that
generalises to a new phrasing; the loss is one mean over the step's assistant tokens however the step
is split into micro-steps and ranks; resuming repeats the uninterrupted run bit for bit; data made
with another tokenizer than the model's is a one-line error.

Teaching an answer starts where a user starts: from the tiny preset pretrained by train_pretrain.py
(the shared `pretrained` fixture of conftest.py). The other runs, which compare runs with each other
or check errors, start from a randomly initialised 2-layer, 64-wide model (`init_model`), which is
faster; both are model directories with the shipped tokenizer.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trainer
import train_sft
from data.loaders import SFTLoader
from data.prepare import main as prepare_main
from errors import NanozhError
from model import load_model
from tokenizer.tokenizer import Tokenizer
from data.train_tokenizer import train as train_tokenizer, write_tokenizer
from conftest import assert_same_state, run_script, step_metrics as metrics

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tokenizer" / "tokenizer.model"
FLAGS = ["--device=cpu", "--dtype=float32", "--batch_size=8", "--lr=1e-2", "--warmup_steps=5", "--log_every=1",
         "--eval_every=0", "--save_every=1000"]

CAPITAL, MOUNTAIN = "中国的首都是北京。", "是珠穆朗玛峰。"
PREFIXES = ["", "请问", "我想知道", "你好，", "麻烦告诉我"]
TAUGHT = [(["中国的首都是哪里？", "中国首都是哪座城市？", "哪座城市是中国的首都？", "中国的首都在哪？"], CAPITAL),
          (["世界上最高的山是哪座？", "最高的山叫什么？", "地球上最高的山是什么？", "哪座山最高？"], MOUNTAIN)]


def chat(*turns: str, system: str | None = None) -> dict:
    roles = ["user", "assistant"] * len(turns)
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": r, "content": c} for r, c in zip(roles, turns)]}


def prepare(tmp: Path, records: list[dict], tokenizer: Path = TOKENIZER) -> Path:
    with open(tmp / "sft.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    # every example in train; near-dedup off: the taught set is one answer phrased many ways on purpose
    prepare_main(["--kind", "sft", "--input", str(tmp / "sft.jsonl"), "--tokenizer", str(tokenizer), "--out",
                  str(tmp / "shards"), "--workers", "1", "--val_fraction", "0", "--no_near_dedup"])
    return tmp / "shards"


@pytest.fixture(scope="module")
def taught(tmp_path_factory) -> Path:
    """Two questions asked 20 ways each, always with the same answer."""
    return prepare(tmp_path_factory.mktemp("taught"),
                   [chat(p + q, a) for qs, a in TAUGHT for p in PREFIXES for q in qs])


@pytest.fixture(scope="module")
def eight(tmp_path_factory) -> Path:
    """Eight conversations with answers of different lengths: each half of them holds a different
    number of assistant tokens."""
    answers = ["好。", "可以的。", "没问题，马上就好。", "这是一个比较长的回答，里面有很多的字。"]
    return prepare(tmp_path_factory.mktemp("eight"),
                   [chat(f"第{i}个问题是什么？", answers[i % 4] * (1 + i // 4)) for i in range(8)])


def train(data: Path, init: Path, out_dir: Path, *flags: str, launcher: tuple = ()) -> subprocess.CompletedProcess:
    return run_script("train_sft.py", *FLAGS, f"--data={data}", f"--init_from={init}", f"--out_dir={out_dir}", *flags,
                      launcher=launcher)


def losses(out_dir: Path) -> dict[int, float]:
    return {s: m["loss"] for s, m in metrics(out_dir).items()}

# -----------------------------------------------------------------------------
# what carries loss


def test_only_assistant_content_and_its_im_end_carry_loss(tmp_path):
    tok = Tokenizer(TOKENIZER)
    conversation = chat("你好！", "你好，有什么可以帮你？", "一加一等于几？", "一加一等于二。", system="你是一个乐于助人的助手。")
    longer = chat("请写一句很长很长的话，越长越好，谢谢你。", "好的，这是一句很长的话：" + "我们一起去公园散步吧，" * 6)
    shards = prepare(tmp_path, [conversation, longer])
    # the layout written out by hand: <|im_start|>role\n content <|im_end|>\n, per turn
    ids, learn = [], []
    for m in conversation["messages"]:
        head, body = [tok.im_start_id] + tok.encode(m["role"] + "\n"), tok.encode(m["content"]) + [tok.im_end_id]
        ids += head + body + tok.encode("\n")
        learn += [False] * len(head) + [m["role"] == "assistant"] * len(body) + [False] * len(tok.encode("\n"))

    x, y = SFTLoader(str(shards), "train", batch_size=2, seed=0, max_len=256).get_batch(0)
    row = next(r for r in range(2) if x[r, 0] == ids[0] and x[r, 1:len(ids) - 1].tolist() == ids[1:-1])
    n = len(ids) - 1
    assert x.shape[1] > n  # the other conversation is longer: this row is padded
    for t in range(n):  # position t predicts token t + 1
        assert y[row, t] == (ids[t + 1] if learn[t + 1] else -1), t
    assert (y[row, n:] == -1).all() and (x[row, n:] == tok.pad_id).all()
    targets = y[row][y[row] != -1].tolist()
    assert targets == tok.encode("你好，有什么可以帮你？") + [tok.im_end_id] + tok.encode("一加一等于二。") + [tok.im_end_id]

# -----------------------------------------------------------------------------
# training


def test_sft_teaches_the_answer_for_an_unseen_phrasing(taught, pretrained, tmp_path):
    # a constant lr: in a run this short the cosine decay to min_lr would leave too few useful steps
    train(taught, pretrained, tmp_path / "run", "--max_steps=80", "--lr=3e-3", "--min_lr=3e-3", "--warmup_steps=2")
    model, tok = load_model(tmp_path / "run" / "latest"), Tokenizer(tmp_path / "run" / "latest")
    for question, answer in [("能不能告诉我中国的首都是哪里？", CAPITAL), ("请你说说世界上最高的山是哪座？", MOUNTAIN)]:
        ids, _ = tok.render_chat([{"role": "user", "content": question}], add_generation_prompt=True)
        out = model.generate(torch.tensor([ids]), 20, temperature=0, stop_ids=[tok.im_end_id])
        assert out[0, len(ids):].tolist() == tok.encode(answer) + [tok.im_end_id], tok.decode(out[0].tolist())


def test_loss_is_one_mean_over_the_step_however_it_is_split(eight, init_model, tmp_path):
    """The 8 examples as one batch, as 2 micro-steps of 4, and on 2 ranks of 4: the same losses and
    gradient norms, and the first loss is the mean NLL over every assistant token of the 8."""
    runs = {"one batch": train(eight, init_model, tmp_path / "a", "--max_steps=3"),
            "2 micro-steps": train(eight, init_model, tmp_path / "b", "--max_steps=3", "--batch_size=4",
                                   "--grad_accum=2"),
            "2 ranks": train(eight, init_model, tmp_path / "c", "--max_steps=3", "--batch_size=4",
                             launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       "--nproc_per_node=2"))}
    assert runs["2 ranks"].stdout.count("step 1 | loss") == 1  # only rank 0 logs
    ref = metrics(tmp_path / "a")
    for out_dir in ("b", "c"):
        got = metrics(tmp_path / out_dir)
        assert sorted(got) == [1, 2, 3]
        for s in got:
            assert got[s]["loss"] == pytest.approx(ref[s]["loss"], abs=1e-5), (out_dir, s)
            assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-4), (out_dir, s)
    x, y = SFTLoader(str(eight), "train", batch_size=8, seed=0, max_len=64).get_batch(0)
    with torch.no_grad():
        _, mean_nll = load_model(init_model)(x, y)
    assert ref[1]["loss"] == pytest.approx(mean_nll.item(), abs=1e-5)
    assert ref[1]["loss_tokens"] == (y != -1).sum() and 0 < ref[1]["pad"] < 0.5


def test_resume_is_bit_exact(eight, init_model, tmp_path):
    """Both runs leave max_steps to --epochs: 4 passes over 8 examples, 4 per step, are 8 steps."""
    flags = ("--max_steps=0", "--epochs=4", "--batch_size=4", "--save_every=4")
    straight = tmp_path / "straight"
    assert "= 4.00 epochs of 8 conversations" in train(eight, init_model, straight, *flags).stdout
    out_dir = tmp_path / "resumed"
    out_dir.mkdir()
    shutil.copytree(straight / "step_0000004", out_dir / "step_0000004")
    (out_dir / "latest").symlink_to("step_0000004")
    assert "resumed from" in train(eight, init_model, out_dir, *flags, "--resume").stdout
    assert sorted(losses(straight)) == list(range(1, 9))
    assert losses(out_dir) == {s: v for s, v in losses(straight).items() if s > 4}
    assert_same_state(out_dir / "latest", straight / "latest")  # weights and optimizer, not only losses

# -----------------------------------------------------------------------------
# what bad input gets


def test_data_from_another_tokenizer_is_a_one_line_error(init_model, tmp_path):
    text = ["".join(chr(0x4E00 + (i * 7 + j) % 100) for j in range(50)) for i in range(200)]
    other = write_tokenizer(train_tokenizer(text, vocab_size=400)[0], str(tmp_path / "tok"))
    shards = prepare(tmp_path, [chat("你好", "你好。")] * 2, tokenizer=other)
    cfg = trainer.parse_config(train_sft.SFTConfig, [*FLAGS, f"--data={shards}", f"--init_from={init_model}",
                                                     f"--out_dir={tmp_path / 'run'}"])
    with pytest.raises(NanozhError) as e:
        train_sft.train(cfg)
    assert str(e.value) == (f"nanozh: {shards / 'tokenizer.model'}: the data was tokenized with another tokenizer "
                            f"than the model in {init_model} (vocab 400 vs {Tokenizer(TOKENIZER).vocab_size}) "
                            f"(prepare the data with --tokenizer {init_model / 'tokenizer.model'})")


@pytest.mark.parametrize("flags, message", [
    ([], "--init_from is required"),
    (["--model.n_layer=3"], "config.json: the checkpoint's model differs from this run's (n_layer 2 != 3)"),
])
def test_missing_init_from_or_another_model_shape_is_an_error(eight, init_model, tmp_path, flags, message):
    init = [] if not flags else [f"--init_from={init_model}"]
    cfg = trainer.parse_config(train_sft.SFTConfig, [*FLAGS, f"--data={eight}", f"--out_dir={tmp_path}", *init, *flags])
    with pytest.raises(NanozhError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train_sft.train(cfg)
