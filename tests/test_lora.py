"""lora.py with train_sft.py and train_dpo.py: adapters with B = 0 leave the logits of the base
unchanged; LoRA training changes only the adapters and the optimizer holds only them; a merged model
computes what base + adapters compute; DPO-LoRA's reference is the frozen base exactly and its loss
starts at ln 2; resume is bit-exact; an adapter whose base changed is refused in one line.

Every run starts from the random 2-layer, 64-wide `init_model` of conftest.py, in this process.
"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lora
import train_dpo
import train_sft
from data.prepare import main as prepare_main
from conftest import train_in_process
from model import load_model

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tokenizer" / "tokenizer.model"
FLAGS = ["--device=cpu", "--dtype=float32", "--batch_size=4", "--lr=1e-2", "--warmup_steps=1", "--log_every=1",
         "--eval_every=0", "--save_every=3", "--max_steps=6", "--lora_rank=4", "--lora_alpha=8"]
PAIRS = [("天空是什么颜色？", "天空是蓝色的。", "天空是绿色的。"), ("一年有几个月？", "一年有十二个月。", "一年有三个月。"),
         ("水在几度结冰？", "水在零度结冰。", "水在一百度结冰。"), ("一周有几天？", "一周有七天。", "一周有十天。")]


def prepare(tmp: Path, kind: str, records: list[dict]) -> Path:
    (tmp / "in.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    prepare_main(["--kind", kind, "--input", str(tmp / "in.jsonl"), "--tokenizer", str(TOKENIZER), "--out",
                  str(tmp / "shards"), "--workers", "1", "--val_fraction", "0", "--no_near_dedup"])
    return tmp / "shards"


def run(script, config_cls, *flags: str) -> None:
    train_in_process(script, config_cls, [*FLAGS, *flags])


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    return prepare(tmp_path_factory.mktemp("sft"), "sft", [{"prompt": q, "response": c} for q, c, _ in PAIRS * 2])


@pytest.fixture(scope="module")
def dpo_data(tmp_path_factory) -> Path:
    return prepare(tmp_path_factory.mktemp("dpo"), "dpo",
                   [{"prompt": p + q, "chosen": c, "rejected": r} for p in ("", "请问") for q, c, r in PAIRS])


@pytest.fixture(scope="module")
def sft_run(sft_data, init_model, tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("sft_lora") / "run"
    run(train_sft, train_sft.SFTConfig, f"--data={sft_data}", f"--init_from={init_model}", f"--out_dir={out_dir}")
    return out_dir


def batch(n: int = 2, T: int = 16) -> torch.Tensor:
    return torch.randint(6, 1000, (n, T), generator=torch.Generator().manual_seed(0))


def test_adapters_with_b_zero_give_the_base_logits(init_model):
    base = load_model(init_model).eval()
    adapted = lora.setup(load_model(init_model), lora.LoraSettings(lora_rank=4), str(init_model), seed=0).eval()
    assert all(m.lora_A.abs().sum() > 0 for m in adapted.modules() if isinstance(m, lora.LoRALinear))
    x = batch()
    assert torch.equal(base(x, x)[0], adapted(x, x)[0])


def test_training_changes_only_the_adapters(sft_run, init_model):
    ckpt = sft_run / "latest"
    assert not (ckpt / "model.safetensors").exists()
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["base"] == str(init_model) and config["rank"] == 4
    adapters = load_file(ckpt / "adapter.safetensors")
    # 2 layers x (qkv, proj, gate_up, down) x (A, B); every B has moved away from zero
    assert len(adapters) == 16 and all(v.abs().sum() > 0 for k, v in adapters.items() if k.endswith("lora_B"))
    model, base = load_model(ckpt), load_model(init_model)
    for name, tensor in base.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    state = torch.load(ckpt / "train_state.pt", weights_only=True)["optimizer"]
    shapes = sorted(tuple(s["exp_avg"].shape) for s in state["state"].values())
    assert shapes == sorted(tuple(v.shape) for v in adapters.values())


def test_merged_model_computes_base_plus_adapters(sft_run, init_model, tmp_path):
    out = tmp_path / "merged"
    result = subprocess.run([sys.executable, "export.py", "--merge", "--model", str(sft_run / "latest"), "--out", str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not (out / "adapter_config.json").exists() and (out / "tokenizer.model").is_file()
    adapted, merged = load_model(sft_run / "latest").eval(), load_model(out).eval()
    x = batch()
    a, m = adapted(x, x)[0], merged(x, x)[0]
    assert torch.allclose(a, m, atol=1e-5, rtol=0)
    assert not torch.allclose(a, load_model(init_model)(x, x)[0], atol=1e-3)  # and the adapters did something


def test_resume_with_lora_is_bit_exact(sft_data, sft_run, init_model, tmp_path):
    out_dir = tmp_path / "resumed"
    out_dir.mkdir()
    shutil.copytree(sft_run / "step_0000003", out_dir / "step_0000003")
    (out_dir / "latest").symlink_to("step_0000003")
    run(train_sft, train_sft.SFTConfig, f"--data={sft_data}", f"--init_from={init_model}", f"--out_dir={out_dir}",
        "--resume")
    a, b = out_dir / "latest", sft_run / "latest"
    assert load_file(a / "adapter.safetensors").keys() == load_file(b / "adapter.safetensors").keys()
    for k, v in load_file(a / "adapter.safetensors").items():
        assert torch.equal(v, load_file(b / "adapter.safetensors")[k]), k
    sa, sb = (torch.load(p / "train_state.pt", weights_only=True)["optimizer"]["state"] for p in (a, b))
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in ("exp_avg", "exp_avg_sq"))
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (out_dir, sft_run)]
    assert losses[0] == losses[1][3:]  # steps 4-6


def test_dpo_reference_is_the_frozen_base_and_loss_starts_at_ln2(dpo_data, init_model, tmp_path):
    out_dir = tmp_path / "dpo"
    run(train_dpo, train_dpo.DPOConfig, f"--data={dpo_data}", f"--init_from={init_model}", f"--out_dir={out_dir}",
        "--lr=1e-3")
    first = json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    policy, base = load_model(out_dir / "latest"), load_model(init_model).eval()
    x = batch()
    mask = torch.ones_like(x, dtype=torch.bool)
    trained = train_dpo.answer_logps(policy, x, x, mask)
    ref = train_dpo.answer_logps(lora.base_view(policy), x, x, mask)
    assert torch.equal(ref, train_dpo.answer_logps(base, x, x, mask).detach())
    assert not torch.equal(ref, trained)  # the adapters did train


def test_adapter_of_a_changed_base_is_a_one_line_error(sft_run, init_model, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(init_model, base)
    adapter_dir = tmp_path / "adapter"
    shutil.copytree(sft_run / "latest", adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, "base": str(base)}))
    assert load_model(adapter_dir) is not None  # the same weights elsewhere are the same base
    changed = load_model(base)
    with torch.no_grad():
        changed.norm.weight.mul_(2)
    changed.save(base)
    result = subprocess.run([sys.executable, "sample.py", "--model", str(adapter_dir), "--prompt", "你好"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("nanozh: ") and "not the one these adapters were trained on" in result.stderr
