"""Shared test setup. Triton kernels run on the CPU interpreter when there is no GPU; the variable
must be set before triton is first imported, which is why it lives here."""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
