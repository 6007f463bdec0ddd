"""Shared test setup.

- Triton kernels run on the CPU interpreter when there is no GPU; the variable must be set before
  triton is first imported, which is why it lives here.
- One thread per process: on the 2-core machines the suite runs on, a second OpenMP thread makes
  the tiny models 2-3x slower (measured; the threads spin-wait for each other), and the
  subprocesses the tests start (training scripts, torchrun) inherit OMP_NUM_THREADS.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def init_model(tmp_path_factory) -> Path:
    """A small random model directory (2 layers, n_embd 64, context 64) with the shipped tokenizer:
    the starting point of the SFT and DPO tests."""
    from model import ModelConfig, Transformer
    from tokenizer.tokenizer import Tokenizer

    tokenizer = ROOT / "tokenizer" / "tokenizer.model"
    out = tmp_path_factory.mktemp("init") / "model"
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=Tokenizer(tokenizer).vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                         block_size=64)
    Transformer(config).save(out)
    shutil.copyfile(tokenizer, out / "tokenizer.model")
    return out


@pytest.fixture(scope="session")
def pretrain_shards(tmp_path_factory) -> Path:
    """A pretraining shard directory (about 200k tokens, val 10%) from the first 12 documents of
    each bundled corpus file, cut to 3000 characters each."""
    import json

    import pyarrow.parquet as pq

    from data.prepare import main as prepare_main

    tmp = tmp_path_factory.mktemp("pretrain_data")
    with open(tmp / "slice.jsonl", "w", encoding="utf-8") as f:
        for path in sorted((ROOT / "data" / "corpus" / "pretrain").glob("*.parquet")):
            for text in pq.read_table(path, columns=["text"]).column("text").to_pylist()[:12]:
                f.write(json.dumps({"text": text[:3000]}, ensure_ascii=False) + "\n")
    prepare_main(["--kind", "pretrain", "--input", str(tmp / "slice.jsonl"), "--tokenizer",
                  str(ROOT / "tokenizer" / "tokenizer.model"), "--out", str(tmp / "shards"), "--workers", "1",
                  "--val_fraction", "0.1"])
    return tmp / "shards"


@pytest.fixture(scope="session")
def pretrained(pretrain_shards, tmp_path_factory) -> Path:
    """The tiny preset (configs/tiny.json: 4 layers, 128 wide, context 256) after a short real run
    of train_pretrain.py on pretrain_shards (20 steps of 4 x 256 tokens, about 7 s on one core):
    its OUT_DIR/latest model directory. What SFT and evaluation start from in their tests, as they
    do outside them; the run is in this process, and pytest gets its signal handlers back."""
    import signal

    import train_pretrain
    import trainer

    out_dir = tmp_path_factory.mktemp("pretrained") / "run"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        train_pretrain.train(trainer.parse_config(train_pretrain.PretrainConfig, [
            "--config", str(ROOT / "configs" / "tiny.json"), f"--data={pretrain_shards}", f"--out_dir={out_dir}",
            "--batch_size=4", "--max_steps=20", "--lr=1e-2", "--warmup_steps=3", "--log_every=5", "--eval_every=0",
            "--save_every=1000", "--device=cpu", "--dtype=float32"]))
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return out_dir / "latest"


def train_in_process(script, config_cls, argv: list[str]) -> None:
    """script.train(parse_config(config_cls, argv)) in this process (faster than a subprocess: no
    torch import); pytest gets its SIGINT/SIGTERM handlers back, which the run replaced."""
    import signal

    import trainer

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        script.train(trainer.parse_config(config_cls, argv))
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def assert_same_state(a, b, where: str = "") -> None:
    """Two checkpoints' weights and train states (optimizer moments, scaler, step, RNG) are equal bit
    for bit; `a`, `b` are checkpoint directories, or parts of their states when it recurses."""
    if isinstance(a, Path):
        for name in ("model.safetensors", "train_state.pt"):
            load = load_file if name.endswith("safetensors") else lambda p: torch.load(p, weights_only=True)
            assert_same_state(load(a / name), load(b / name), f"{a.name}/{name}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def run_script(script: str, *args: str, launcher: tuple = ()) -> subprocess.CompletedProcess:
    """Run ROOT/script with args as a user would (one OpenMP thread; launcher: e.g. torchrun's
    command), and check that it succeeded."""
    cmd = [*(launcher or [sys.executable]), str(ROOT / script), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def step_metrics(out_dir: Path, key: str = "loss") -> dict[int, dict]:
    """The records of OUT_DIR/metrics.jsonl that hold `key`, by step."""
    from files import read_jsonl

    return {m["step"]: m for _, m in read_jsonl(out_dir / "metrics.jsonl") if key in m}
