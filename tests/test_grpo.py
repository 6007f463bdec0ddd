"""train_grpo.py: the reward is the last number of the answer; arithmetic problems are a pure function of
(seed, index); the loss equals a hand computation (advantages, clipped ratio, masking, k3 KL), the first
PPO epoch has ratio exactly 1 and prompt and padding tokens get no gradient; training raises the reward;
resuming repeats the uninterrupted run bit for bit, sampling included; two ranks equal one rank with two
micro-steps; bad settings and task files are one-line errors.

The runs start from an "SFT model" made here the way a user makes one: the random 2-layer, 64-wide model
of conftest.py fine-tuned by train_sft.py on four questions with fixed numeric answers (一周有几天？ 7, ...),
where every question is shown with every one of the four answers. It has learned the format (a number,
then <|im_end|>) but not which number goes with which question: it samples the right one about a
quarter of the time, so GRPO has both right and wrong answers in most groups to compare.
"""

import json
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trainer
import train_grpo
import train_sft
from conftest import assert_same_state, run_script, step_metrics as metrics
from data.prepare import main as prepare_main
from errors import NanozhError

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tokenizer" / "tokenizer.model"
QUESTIONS = [("一周有几天？", 7), ("一年有几个月？", 12), ("一天有几个小时？", 24), ("一小时有几分钟？", 60)]
FLAGS = ["--device=cpu", "--dtype=float32", "--batch_size=2", "--group_size=4", "--max_new_tokens=4", "--lr=1e-3",
         "--warmup_steps=1", "--log_every=1", "--eval_every=2", "--save_every=2", "--eval_prompts=4", "--kl_coef=0.1",
         "--ppo_epochs=2"]


@pytest.fixture(scope="module")
def sft_model(init_model, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("grpo_sft")
    with open(tmp / "sft.jsonl", "w", encoding="utf-8") as f:
        for q, _ in QUESTIONS:
            for _, a in QUESTIONS:
                f.write(json.dumps({"prompt": q, "response": str(a)}, ensure_ascii=False) + "\n")
    prepare_main(["--kind", "sft", "--input", str(tmp / "sft.jsonl"), "--tokenizer", str(TOKENIZER), "--out",
                  str(tmp / "shards"), "--workers", "1", "--val_fraction", "0", "--no_near_dedup", "--no_exact_dedup"])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        train_sft.train(trainer.parse_config(train_sft.SFTConfig, [
            f"--init_from={init_model}", f"--data={tmp / 'shards'}", f"--out_dir={tmp / 'sft'}", "--device=cpu",
            "--dtype=float32", "--batch_size=16", "--lr=1e-2", "--warmup_steps=5", "--log_every=100",
            "--eval_every=0", "--save_every=1000", "--max_steps=60"]))
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return tmp / "sft" / "latest"


def write_task(path: Path, questions: list[tuple[str, int]]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for prefix in ("", "请问", "我想知道", "你好，", "麻烦告诉我"):
            for q, a in questions:
                f.write(json.dumps({"prompt": prefix + q, "answer": a}, ensure_ascii=False) + "\n")
    return path


def train(init: Path, task: Path, out_dir: Path, *flags: str, launcher: tuple = ()) -> subprocess.CompletedProcess:
    return run_script("train_grpo.py", *FLAGS, f"--init_from={init}", f"--task={task}", f"--out_dir={out_dir}", *flags,
                      launcher=launcher)



# -----------------------------------------------------------------------------
# reward, task, loss


def test_reward_is_one_when_the_last_number_is_the_gold_one():
    assert train_grpo.reward("3加4等于7。", 7.0) == (1.0, True)
    assert train_grpo.reward("先算3+4=7，不对，是8", 7.0) == (0.0, False)  # the last number counts
    assert train_grpo.reward("没有数字", 7.0) == (0.0, False)
    assert train_grpo.reward("一共1,000个", 1000.0) == (1.0, True)
    assert train_grpo.reward("答案：7", 7.0, format_weight=0.5) == (1.5, True)
    assert train_grpo.reward("答案：8。", 7.0, format_weight=0.5) == (0.5, False)


def test_arithmetic_problems_are_a_pure_function_of_seed_and_index():
    a = [train_grpo.arithmetic_problem(1, "train", i, "+-*", 9) for i in range(50)]
    assert a == [train_grpo.arithmetic_problem(1, "train", i, "+-*", 9) for i in range(50)]
    assert a != [train_grpo.arithmetic_problem(2, "train", i, "+-*", 9) for i in range(50)]
    for prompt, answer in a:
        x, y = map(int, [n for n in train_grpo.NUMBER.findall(prompt)])
        assert answer in (x + y, x - y, x * y) and answer >= 0, prompt


def test_loss_matches_a_hand_computation():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])  # the second group has no signal
    adv = train_grpo.group_advantages(rewards, eps=1e-4)
    s = math.sqrt(1 / 3)  # sample std of 1, 0, 0, 1
    assert torch.allclose(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-4)) and torch.all(adv[1] == 0)
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.5, -0.7]], requires_grad=True)
    old = torch.tensor([[-1.5, -2.5, -0.1], [-0.3, -1.0, -0.7]])
    ref = torch.tensor([[-1.2, -2.5, -0.4], [-0.1, -1.5, -0.9]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # a prompt token, answer tokens, padding
    a = torch.tensor([2.0, -1.0])
    loss, kl, clipped = train_grpo.grpo_loss(logps, old, ref, a, mask, clip_eps=0.2, kl_coef=0.1)
    want, want_clipped = torch.zeros(2, 3), torch.zeros(2, 3)
    for i in range(2):
        for t in range(3):
            r = math.exp(logps[i, t].item() - old[i, t].item())
            d = ref[i, t].item() - logps[i, t].item()
            k3 = math.exp(d) - d - 1
            surrogate = min(r * a[i].item(), min(max(r, 0.8), 1.2) * a[i].item())
            want[i, t] = mask[i, t] * (-surrogate + 0.1 * k3)
            want_clipped[i, t] = mask[i, t] * (min(max(r, 0.8), 1.2) * a[i].item() < r * a[i].item())
    assert torch.allclose(loss, want) and torch.equal(clipped, want_clipped)
    assert clipped.sum() == 2  # row 0 token 1 (ratio 1.65, A > 0) and row 1 token 1 (ratio 0.61, A < 0)
    assert kl[0, 0] == 0 and kl[0, 1] > 0
    loss.sum().backward()
    assert logps.grad[0, 0] == 0 and logps.grad[1, 2] == 0  # prompt and padding: no gradient
    assert logps.grad[0, 1].item() == pytest.approx(0.1 * (1 - math.exp(-2.5 + 2.0)))  # clipped: the KL term's only


def test_first_epoch_ratio_is_exactly_one_and_gives_the_policy_gradient():
    logps = torch.tensor([[-0.7, -2.3, -1.1]], requires_grad=True)
    mask, adv = torch.tensor([[0.0, 1.0, 1.0]]), torch.tensor([1.5])
    loss, _, clipped = train_grpo.grpo_loss(logps, None, None, adv, mask, clip_eps=0.2, kl_coef=0.0)
    assert torch.equal(loss, -1.5 * mask) and clipped.sum() == 0  # ratio exp(0) = 1 exactly
    loss.sum().backward()
    assert torch.equal(logps.grad, -1.5 * mask)  # -A * grad log pi on the answer tokens only


def test_prompt_and_padding_get_no_gradient(sft_model):
    """Through the real model: a row's loss does not depend on its prompt's or padding's log-probs."""
    from model import load
    model, tok = load(sft_model)
    prompts = [tok.prompt_ids([{"role": "user", "content": QUESTIONS[0][0]}])] * 2
    answers = [tok.encode("7") + [tok.im_end_id], tok.encode("12") + [tok.im_end_id]]
    x, y = train_grpo.pack(prompts, answers, tok.pad_id)
    assert (y != -1).sum() == 5 and x[0, -1] == tok.pad_id  # "7", "1", "2" and two <|im_end|>; row 0 padded
    logps = train_grpo.token_logps(model, x, y).detach().requires_grad_(True)
    loss, _, _ = train_grpo.grpo_loss(logps, None, None, torch.tensor([1.0, -1.0]), (y != -1).float(), 0.2, 0.0)
    loss.sum().backward()
    assert torch.equal(logps.grad != 0, y != -1)

# -----------------------------------------------------------------------------
# real runs


def test_training_raises_the_reward(sft_model, tmp_path):
    """One question (一周有几天？ 7) in five phrasings, one held out: the SFT model answers 7 a quarter of
    the time; after 12 steps of GRPO it answers 7 greedily, the held-out phrasing included."""
    task = write_task(tmp_path / "task.jsonl", QUESTIONS[:1])
    train(sft_model, task, tmp_path / "run", "--max_steps=12", "--eval_every=12", "--eval_prompts=1",
          "--batch_size=4", "--group_size=8", "--lr=3e-3", "--kl_coef=0", "--ppo_epochs=1", "--save_every=100")
    m, val = metrics(tmp_path / "run"), metrics(tmp_path / "run", "val_acc")
    assert val[0]["val_acc"] == 0 and val[12]["val_acc"] == 1
    assert m[1]["reward"] < 0.6 and m[12]["reward"] > 0.8, {s: r["reward"] for s, r in m.items()}
    assert all(r["clip_frac"] == 0 for r in m.values())  # one PPO epoch: always on-policy, ratio 1


def test_resume_is_bit_exact(sft_model, tmp_path):
    """Two PPO epochs and a KL term, so old log-probs, the reference and clipping are all exercised."""
    task = write_task(tmp_path / "task.jsonl", QUESTIONS)
    straight = tmp_path / "straight"
    train(sft_model, task, straight, "--max_steps=4")
    out_dir = tmp_path / "resumed"
    out_dir.mkdir()
    shutil.copytree(straight / "step_0000002", out_dir / "step_0000002")
    (out_dir / "latest").symlink_to("step_0000002")
    assert "resumed from" in train(sft_model, task, out_dir, "--max_steps=4", "--resume").stdout
    keys = ("loss", "reward", "kl", "clip_frac", "answer_len", "grad_norm")
    a, b = metrics(straight), metrics(out_dir)
    assert {s: [a[s][k] for k in keys] for s in (3, 4)} == {s: [b[s][k] for k in keys] for s in (3, 4)}
    assert any(a[s]["kl"] > 0 for s in a)
    assert_same_state(out_dir / "latest", straight / "latest")


def test_two_ranks_match_one_rank_with_two_micro_steps(sft_model, tmp_path):
    task = write_task(tmp_path / "task.jsonl", QUESTIONS)
    one, two = tmp_path / "one", tmp_path / "two"
    train(sft_model, task, one, "--max_steps=2", "--batch_size=1", "--grad_accum=2")
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    train(sft_model, task, two, "--max_steps=2", "--batch_size=1", launcher=launcher)
    a, b = metrics(one), metrics(two)
    assert sorted(a) == sorted(b) == [1, 2]
    for s in a:
        for k in ("reward", "acc", "zero_signal", "answer_len"):  # the same samples
            assert a[s][k] == pytest.approx(b[s][k], abs=1e-6), (k, s)
        for k in ("loss", "kl", "clip_frac", "grad_norm"):  # the same gradient, summed in another order
            assert a[s][k] == pytest.approx(b[s][k], abs=1e-5), (k, s)
    assert metrics(one, "val_acc")[2]["val_acc"] == metrics(two, "val_acc")[2]["val_acc"]

# -----------------------------------------------------------------------------
# what bad input gets


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "一周有几天？", "answer": "七"}', 'task.jsonl:2: "answer" is \'七\', not a number'),
    ('{"question": "一周有几天？", "answer": 7}', 'task.jsonl:2: each line needs a non-empty "prompt" string'),
    ('{"prompt": "一周有几天？", "answer": 7', "task.jsonl:2: malformed JSON")])
def test_a_bad_task_line_is_a_one_line_error(sft_model, tmp_path, line, message):
    (tmp_path / "task.jsonl").write_text('{"prompt": "一年有几个月？", "answer": 12}\n' + line + "\n", encoding="utf-8")
    cfg = trainer.parse_config(train_grpo.GRPOConfig, [*FLAGS, f"--init_from={sft_model}", f"--out_dir={tmp_path}/o",
                                                       f"--task={tmp_path / 'task.jsonl'}"])
    with pytest.raises(NanozhError, match=message.replace("(", r"\(")) as e:
        train_grpo.train(cfg)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("flag, message", [("--group_size=1", "--group_size=1 must be at least 2"),
                                           ("--task_ops=/", "--task_ops='/' must use only"),
                                           ("--eval_prompts=20", "20 problems leave none to train on")])
def test_bad_settings_are_one_line_errors(sft_model, tmp_path, flag, message):
    task = write_task(tmp_path / "task.jsonl", QUESTIONS)
    if flag.startswith("--task_ops"):
        task = "arithmetic"
    cfg = trainer.parse_config(train_grpo.GRPOConfig, [*FLAGS, f"--init_from={sft_model}", f"--out_dir={tmp_path}/o",
                                                       f"--task={task}", flag])
    with pytest.raises(NanozhError, match=message):
        train_grpo.train(cfg)
