"""Shared test setup.

- Triton kernels run on the CPU interpreter when there is no GPU; the variable must be set before
  triton is first imported, which is why it lives here.
- One thread per process: on the 2-core machines the suite runs on, a second OpenMP thread makes
  the tiny models 2-3x slower (measured; the threads spin-wait for each other), and the
  subprocesses the tests start (training scripts, torchrun) inherit OMP_NUM_THREADS.
"""

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


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
