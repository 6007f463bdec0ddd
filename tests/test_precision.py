"""The GPU code paths of training, run where the tests run, on the CPU: bf16 autocast, fp16 with
the GradScaler, and --compile (inductor, which compiles C++ for the CPU) each train the model through
train_pretrain.train and lower its loss; MFU is the model's FLOPs at the measured speed over the
peak of every GPU.

Every run trains a 2-layer, 32-wide model for a few steps on the shared pretraining shards.
"""

import json
import signal
from pathlib import Path

import pytest
import torch

import train_pretrain
import trainer
from model import ModelConfig, Transformer
from train_pretrain import PretrainConfig

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8
TINY = ["--config", str(ROOT / "configs" / "tiny.json"), "--model.n_layer=2", "--model.n_embd=32",
        "--model.n_head=2", "--model.n_kv_head=1", "--model.block_size=64", "--batch_size=2", "--grad_accum=2",
        f"--max_steps={STEPS}", "--lr=1e-2", "--warmup_steps=2", "--log_every=1", "--eval_every=0",
        f"--save_every={STEPS}", "--device=cpu"]


def train(shards: Path, out_dir: Path, *flags: str) -> dict[str, list[float]]:
    """A run in this process; its loss and gradient norm at each step. Training installs its own
    SIGINT/SIGTERM handlers; pytest gets its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        train_pretrain.train(trainer.parse_config(PretrainConfig, [*TINY, f"--data={shards}", f"--out_dir={out_dir}",
                                                                   *flags]))
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {key: [m[key] for m in records if "loss" in m] for key in ("loss", "grad_norm")}


def assert_learns(losses: list[float]) -> None:
    assert len(losses) == STEPS
    assert max(losses[-2:]) < losses[0] - 0.15, losses


def assert_close(run: dict[str, list[float]], reference: dict[str, list[float]], tolerance: float) -> None:
    """Step for step the losses and the gradient norms (true ones: unscaled, before clipping) of
    the reference run, within tolerance."""
    assert run["loss"] == pytest.approx(reference["loss"], abs=tolerance)
    assert run["grad_norm"] == pytest.approx(reference["grad_norm"], rel=10 * tolerance)


@pytest.fixture(scope="module")
def float32(pretrain_shards, tmp_path_factory) -> dict[str, list[float]]:
    """The reference: the same run in float32, uncompiled."""
    return train(pretrain_shards, tmp_path_factory.mktemp("float32") / "run", "--dtype=float32")


# -----------------------------------------------------------------------------
# precision


def test_bf16_autocast_training_lowers_the_loss_as_float32_does(pretrain_shards, float32, tmp_path):
    run = train(pretrain_shards, tmp_path / "run", "--dtype=bfloat16")
    assert_learns(run["loss"])
    assert_close(run, float32, 0.01)
    state = torch.load(tmp_path / "run" / "latest" / "train_state.pt", weights_only=True)
    assert not state["scaler"]  # bf16 has fp32's range: no loss scaling


def test_fp16_training_through_the_grad_scaler_lowers_the_loss_as_float32_does(pretrain_shards, float32, tmp_path):
    # Adam would hide gradients left scaled by 2^16 (its step does not depend on their scale):
    # the logged gradient norms, equal to float32's, show they were unscaled
    run = train(pretrain_shards, tmp_path / "run", "--dtype=float16")
    assert_learns(run["loss"])
    assert_close(run, float32, 0.01)
    state = torch.load(tmp_path / "run" / "latest" / "train_state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0  # the scaler ran, and its scale is saved for a resume


def test_compiled_training_gives_the_losses_of_eager_training(pretrain_shards, float32, tmp_path):
    run = train(pretrain_shards, tmp_path / "run", "--dtype=float32", "--compile")
    assert_learns(run["loss"])
    assert_close(run, float32, 1e-4)

# -----------------------------------------------------------------------------
# MFU


def test_mfu_is_model_flops_at_the_measured_speed_over_the_peak_of_all_gpus(monkeypatch):
    config = ModelConfig(vocab_size=1000, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=128)
    # by hand, per layer: attention q, o 64x64, k, v 64x32 (2 of 4 heads' width); SwiGLU 3 x 64x192
    # (8/3 * 64 rounded up to a multiple of 64); the head 1024x64 (vocab padded to 64); 6 FLOPs per
    # weight per token for forward + backward, plus 12 * layers * width * context for QK^T and AV
    matmul_weights = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 192) + 1024 * 64
    flops_per_token = 6 * matmul_weights + 12 * 2 * 64 * 128
    assert flops_per_token == 1_179_648
    with torch.device("meta"):
        assert Transformer(config).flops_per_token(128) == flops_per_token
    monkeypatch.setattr(trainer, "peak_flops", lambda device: 1e12)
    gpus = trainer.Dist(rank=0, local_rank=0, world_size=2, device=torch.device("cuda", 0))
    # 500k tokens/s x 1,179,648 FLOPs = 5.9e11 FLOP/s, over 2 x 1e12
    assert trainer.mfu(flops_per_token, 500_000, gpus) == pytest.approx(0.294912, rel=1e-12)


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA A10G", 125), ("NVIDIA GeForce RTX 4090", 165), ("Some Future GPU", None),
])
def test_peak_flops_is_looked_up_by_gpu_name(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert trainer.peak_flops(torch.device("cuda", 0)) == (tflops and tflops * 1e12)


def test_mfu_is_not_reported_on_a_cpu():
    assert trainer.peak_flops(torch.device("cpu")) is None
    assert trainer.mfu(1e6, 1e4, trainer.Dist()) is None
