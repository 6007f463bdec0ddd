"""Shared test setup.

- Triton kernels run on the CPU interpreter when there is no GPU; the variable must be set before
  triton is first imported, which is why it lives here.
- One thread per process: on the 2-core machines the suite runs on, a second OpenMP thread makes
  the tiny models 2-3x slower (measured; the threads spin-wait for each other), and the
  subprocesses the tests start (training scripts, torchrun) inherit OMP_NUM_THREADS.
"""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
