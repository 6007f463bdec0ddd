"""train_dpo.py: dpo_loss is the formula; at the first step (policy == reference) the loss is ln 2 and
the rewards are 0; the reference never changes, has no gradients and is not in the optimizer;
training makes the policy prefer the chosen answers; precomputed reference log-probs give the losses
of the live reference; resuming repeats the uninterrupted run bit for bit.

Policy and reference start from a randomly initialised 2-layer, 64-wide model directory (standing in
for an SFT model), on 16 preference pairs: a right and a wrong answer to 8 questions, each asked twice.
"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trainer
import train_dpo
from data.prepare import main as prepare_main
from errors import NanozhError
from model import load_model
from conftest import assert_same_state, run_script, step_metrics as metrics

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tokenizer" / "tokenizer.model"
STEPS = 12
FLAGS = ["--device=cpu", "--dtype=float32", "--batch_size=4", f"--max_steps={STEPS}", "--lr=1e-3",
         "--warmup_steps=2", "--log_every=1", "--eval_every=6", "--save_every=6", "--beta=0.1"]
PAIRS = [("天空是什么颜色？", "天空是蓝色的。", "天空是绿色的。"), ("一年有几个月？", "一年有十二个月。", "一年有三个月。"),
         ("水在几度结冰？", "水在零度结冰。", "水在一百度结冰。"), ("太阳从哪边升起？", "太阳从东边升起。", "太阳从北边升起。"),
         ("一周有几天？", "一周有七天。", "一周有十天。"), ("人有几只手？", "人有两只手。", "人有五只手。"),
         ("中国的首都是哪里？", "是北京。", "是东京。"), ("雪是什么颜色？", "雪是白色的。", "雪是黑色的。")]
LN2 = torch.tensor(math.log(2)).item()  # ln 2 as float32 computes it


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dpo_data")
    with open(tmp / "dpo.jsonl", "w", encoding="utf-8") as f:
        for prefix in ("", "请问"):
            for q, chosen, rejected in PAIRS:
                record = {"prompt": prefix + q, "chosen": chosen, "rejected": rejected}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    prepare_main(["--kind", "dpo", "--input", str(tmp / "dpo.jsonl"), "--tokenizer", str(TOKENIZER), "--out",
                  str(tmp / "shards"), "--workers", "1", "--val_fraction", "0.25", "--no_near_dedup"])
    return tmp / "shards"


def train(data: Path, init: Path, out_dir: Path, *flags: str, launcher: tuple = ()) -> subprocess.CompletedProcess:
    return run_script("train_dpo.py", *FLAGS, f"--data={data}", f"--init_from={init}", f"--out_dir={out_dir}", *flags,
                      launcher=launcher)




@pytest.fixture(scope="module")
def straight(data, init_model, tmp_path_factory) -> Path:
    """The reference run: STEPS steps with a live reference model, never interrupted."""
    out_dir = tmp_path_factory.mktemp("straight") / "run"
    train(data, init_model, out_dir)
    return out_dir

# -----------------------------------------------------------------------------
# the loss


def test_dpo_loss_matches_hand_computed_values():
    pc, pr = torch.tensor([-1.0, -5.0, -2.0]), torch.tensor([-3.0, -4.0, -2.0])
    rc, rr = torch.tensor([-2.0, -4.0, -3.0]), torch.tensor([-2.0, -4.0, -1.0])
    # z = (pc - rc) - (pr - rr) = [2, -1, 2]; with beta 0.5: beta * z = [1, -0.5, 1]
    softplus = lambda v: math.log1p(math.exp(v))  # -logsigmoid(t) = softplus(-t)
    loss, chosen, rejected = train_dpo.dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.tolist() == pytest.approx([softplus(-1), softplus(0.5), softplus(-1)], abs=1e-6)
    assert chosen.tolist() == [0.5, -0.5, 0.5] and rejected.tolist() == [-0.5, 0.0, -0.5]
    smoothed, _, _ = train_dpo.dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    expected = [0.9 * softplus(-t) + 0.1 * softplus(t) for t in (1, -0.5, 1)]
    assert smoothed.tolist() == pytest.approx(expected, abs=1e-6)


def test_rewards_are_detached_and_the_loss_pushes_chosen_up_and_rejected_down():
    pc, pr = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    loss, chosen, rejected = train_dpo.dpo_loss(pc, pr, torch.zeros(2), torch.zeros(2), beta=0.1)
    loss.sum().backward()
    assert not chosen.requires_grad and not rejected.requires_grad
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_first_step_has_loss_ln2_and_zero_rewards(straight):
    first = metrics(straight)[1]  # computed before any update: the policy is the reference
    assert first["loss"] == LN2
    assert first["chosen_reward"] == first["rejected_reward"] == first["margin"] == 0.0
    val = metrics(straight, "val_loss")[0]
    assert val["val_loss"] == LN2 and val["val_margin"] == 0.0

# -----------------------------------------------------------------------------
# training


def test_reference_is_frozen_and_not_in_the_optimizer(data, init_model, tmp_path, monkeypatch):
    built, runs = [], []  # the models train_dpo builds (policy, then reference) and its Run
    build_model, start_run = trainer.build_model, trainer.start_run
    monkeypatch.setattr(trainer, "build_model", lambda *a, **k: built.append(build_model(*a, **k)) or built[-1])
    monkeypatch.setattr(trainer, "start_run", lambda *a, **k: runs.append(start_run(*a, **k)) or runs[-1])
    cfg = trainer.parse_config(train_dpo.DPOConfig, [*FLAGS, "--max_steps=3", "--eval_every=0", f"--data={data}",
                                                     f"--init_from={init_model}", f"--out_dir={tmp_path / 'run'}"])
    train_dpo.train(cfg)
    (policy, reference), optimizer = built, runs[0].optimizer
    start = load_model(init_model).state_dict()
    assert all(torch.equal(v, start[k]) for k, v in reference.state_dict().items())
    assert not any(torch.equal(v, start[k]) for k, v in policy.state_dict().items() if "norm" not in k)
    assert all(p.grad is None and not p.requires_grad for p in reference.parameters())
    assert not reference.training
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in policy.parameters()}
    assert not in_optimizer & {id(p) for p in reference.parameters()}


def test_training_raises_reward_accuracy_and_margin(straight):
    m = metrics(straight)
    assert m[STEPS]["reward_acc"] > 0.9, m[STEPS]
    assert m[STEPS]["margin"] > m[3]["margin"] > m[1]["margin"] == 0
    val = metrics(straight, "val_loss")  # the held-out pairs too
    assert val[STEPS]["val_reward_acc"] > 0.9 and val[STEPS]["val_margin"] > val[6]["val_margin"] > 0


def test_precomputed_reference_gives_the_same_losses(data, init_model, straight, tmp_path):
    result = train(data, init_model, tmp_path / "run", "--precompute_ref")
    assert "reference log-probs (train)" in result.stderr
    live, pre = metrics(straight), metrics(tmp_path / "run")
    assert sorted(pre) == list(range(1, STEPS + 1))
    for s in live:
        assert pre[s]["loss"] == pytest.approx(live[s]["loss"], abs=1e-6), s
    live_val, pre_val = metrics(straight, "val_loss"), metrics(tmp_path / "run", "val_loss")
    for s in live_val:
        assert pre_val[s]["val_loss"] == pytest.approx(live_val[s]["val_loss"], abs=1e-6), s


def test_two_ranks_with_precomputed_reference_match_one_rank_with_two_micro_steps(data, init_model, tmp_path):
    """Each rank computes part of the reference table and the parts are summed over ranks."""
    one = tmp_path / "one"
    train(data, init_model, one, "--batch_size=2", "--grad_accum=2", "--max_steps=6")
    two = tmp_path / "two"
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    train(data, init_model, two, "--batch_size=2", "--max_steps=6", "--precompute_ref", launcher=launcher)
    for key in ("loss", "val_loss"):
        a, b = metrics(one, key), metrics(two, key)
        assert sorted(a) == sorted(b) and len(a) >= 2
        for s in a:
            assert b[s][key] == pytest.approx(a[s][key], abs=1e-6), (key, s)
            assert b[s].get("reward_acc") == a[s].get("reward_acc")


def test_resume_is_bit_exact(data, init_model, straight, tmp_path):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    shutil.copytree(straight / "step_0000006", out_dir / "step_0000006")
    (out_dir / "latest").symlink_to("step_0000006")
    assert "resumed from" in train(data, init_model, out_dir, "--resume").stdout
    assert {s: m["loss"] for s, m in metrics(out_dir).items()} == \
        {s: m["loss"] for s, m in metrics(straight).items() if s > 6}
    assert_same_state(out_dir / "latest", straight / "latest")  # weights and optimizer, not only losses

# -----------------------------------------------------------------------------
# what bad input gets


@pytest.mark.parametrize("flag, message", [("--beta=0", "--beta=0.0 must be positive"),
                                           ("--label_smoothing=0.5", "--label_smoothing=0.5 is outside [0, 0.5)")])
def test_bad_beta_or_label_smoothing_is_an_error(data, init_model, tmp_path, flag, message):
    cfg = trainer.parse_config(train_dpo.DPOConfig, [*FLAGS, flag, f"--data={data}", f"--init_from={init_model}",
                                                     f"--out_dir={tmp_path}"])
    with pytest.raises(NanozhError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        train_dpo.train(cfg)
