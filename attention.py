"""Attention for nanozh: one entry point, three implementations.

    attention(q, k, v, causal, impl)   q (B, H, Tq, D), k/v (B, H_kv, Tk, D) -> (B, H, Tq, D)

impl is "triton" (the fused FlashAttention-2 kernel below, the default on CUDA), "sdpa"
(torch.nn.functional.scaled_dot_product_attention, the default on CPU) or "naive" (explicit
softmax(QK^T/sqrt(D))V, the reference the tests compare against). All three give the same numbers
within tolerance.

Conventions shared by all three:
- grouped-query attention: H is a multiple of H_kv and query head h reads kv head h // (H // H_kv);
- Tq <= Tk, and with causal=True the causal diagonal is aligned bottom-right: query i (of Tq) sees
  keys 0 .. Tk - Tq + i. That is the KV-cache case: the Tq new queries are the last Tq positions.
"""

import math

import torch
import torch.nn.functional as F


def _causal_mask(Tq: int, Tk: int, device: torch.device) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True where query i may attend key j (bottom-right aligned)."""
    i = torch.arange(Tq, device=device)[:, None]
    j = torch.arange(Tk, device=device)[None, :]
    return j <= i + (Tk - Tq)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Reference attention: materialises the (Tq, Tk) score matrix and repeats K/V for GQA."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(~_causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    # softmax in at least fp32 (fp64 stays fp64: the tests use it as ground truth)
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    return probs.to(q.dtype) @ v


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """PyTorch's fused attention. Its is_causal flag aligns the diagonal top-left, which is only
    right when Tq == Tk, so for Tq < Tk (prefill onto a KV cache) we pass an explicit mask; a
    single query (decode) sees every key, so it needs no mask at all."""
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if not causal or Tq == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(Tq, Tk, q.device), enable_gqa=gqa)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, impl: str = "sdpa") -> torch.Tensor:
    """Dispatch to one implementation by name ("triton" | "sdpa" | "naive")."""
    if impl == "sdpa":
        return sdpa_attention(q, k, v, causal)
    if impl == "naive":
        return naive_attention(q, k, v, causal)
    if impl == "triton":
        return flash_attention(q, k, v, causal)
    raise ValueError(f"unknown attn_impl {impl!r} (use triton, sdpa or naive)")


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    raise NotImplementedError("the Triton kernel lands with issue 5")
