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

How the fused kernel works (FlashAttention-2, Dao 2023; the names are the paper's)
--------------------------------------------------------------------------------
Naive attention writes the whole (Tq, Tk) score matrix S = scale * Q K^T (scale = 1/sqrt(D)) to
GPU memory, reads it back to softmax it, writes P, reads it again for P V: O(T^2) memory traffic,
and the GPU spends its time waiting on memory. The fused kernel never materialises S. Each program owns a tile of BLOCK_M
query rows, keeps it on chip, and streams the keys and values past it BLOCK_N rows at a time, doing
both matmuls of a tile in registers/shared memory before loading the next.

The softmax needs a row's max and sum before it can normalise anything. The online softmax keeps,
per query row, the running max m, the running sum l of exp(s - m) and an unnormalised output O,
and rescales them whenever a new tile raises the max:
    m_new = max(m, rowmax(S_j))
    alpha = exp(m - m_new)              what was summed under the old max, in units of the new one
    P_j   = exp(S_j - m_new)            every entry <= 1: no overflow, however large the scores
    l     = alpha * l + rowsum(P_j)
    O     = alpha * O + P_j V_j
and divides O by l once at the end: exactly softmax(S) V, up to rounding. The forward also saves
LSE = m + log(l), the log of each row's softmax denominator: with it the backward recomputes
P = exp(S - LSE) tile by tile instead of storing the (Tq, Tk) matrix.
All exponentials are base 2 (exp2 is the GPU's native instruction): log2(e) is folded into the
softmax scale once, so S, m and LSE are in log2 units inside the kernels.

Backward, with dO the gradient of O and D_i = rowsum(dO * O) (one number per query row, computed
by a small preprocess kernel; "Delta" in the code, as D is the head dim):
    P = exp(S - LSE)    dV = P^T dO    dP = dO V^T    dS = P * (dP - D_i)
    dQ = scale * dS K                  dK = scale * dS^T Q
dK and dV are sums over query rows, dQ a sum over key rows. One kernel owns a key tile and walks
the query tiles (dK, dV); a second owns a query tile and walks the key tiles (dQ). FlashAttention-2
instead adds into dQ from the first kernel with atomics, which saves recomputing S and dP but makes
the order of the additions, and so the gradient's last bits, change from run to run; two kernels
are deterministic (a resumed run retraces the original) at the cost of two extra tile matmuls.
Grouped-query attention: the dK/dV program of a kv head loops over the query heads that read it and
sums their contributions in registers: no repeated K/V in memory, no extra reduction pass.

Causal masking: a tile entirely above the diagonal is never visited, a tile entirely below it needs
no mask, and only the tiles on the diagonal or on the ragged end of a sequence pay for tl.where.
Each loop is therefore split in two calls of one tile function, MASKED=False then MASKED=True.
"""

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from errors import user_error


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


# ----------------------------------------------------------------------------------------------
# tile sizes

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton on the CPU (tests without a GPU)
HEAD_DIMS = (32, 64, 128)


def _configs(gpu: list[tuple[int, int, int, int]], cpu: tuple[int, int]) -> list[triton.Config]:
    """Autotune candidates (BLOCK_M, BLOCK_N, num_warps, num_stages), around the tile shapes of
    Triton's fused-attention tutorial; triton.autotune times each on the first call per key, keeps
    the fastest on this GPU and skips any that do not fit its shared memory. Under the CPU
    interpreter there is one small config: timing numpy teaches nothing, and small tiles make small
    test shapes cross many tile edges."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": cpu[0], "BLOCK_N": cpu[1]}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in gpu]


# Tuned once per (head dim, causal, sequence lengths rounded up to a power of two) and dtype, not
# once per length: generation with a KV cache sees a new key length at every step.
_KEY = ["BLOCK_D", "CAUSAL", "Q_BUCKET", "K_BUCKET"]
# BLOCK_M indexes queries and BLOCK_N keys in every kernel. The CPU tiles differ in size so that the
# tests cover a query tile straddling several key tiles, and the reverse.
_FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4)], (32, 16))
_DKDV_CONFIGS = _configs([(32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3)], (16, 32))
_DQ_CONFIGS = _configs([(128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3)], (32, 16))
_PRE_BLOCK_M = 64


# ----------------------------------------------------------------------------------------------
# forward: O = softmax(S) V and LSE, one program per (query tile, batch * head)

@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, lo, hi, offs_m, Tq, Tk, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Fold key/value tiles [lo, hi) into the running (O, l, m) of one query tile."""
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = K + offs_n[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = V + offs_n[:, None] * stride_vt + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < Tk, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < Tk, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # S_j, log2 units
        if MASKED:
            visible = offs_n[None, :] < Tk
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + (Tk - Tq))
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = m_new
        if MASKED:
            # a row that has seen no visible key yet has m_new = -inf, and -inf - (-inf) is NaN:
            # shift by 0 instead, which leaves its P_j = 0 and its alpha = 0
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY)
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                H, GROUP, Tq, Tk, qk_scale, Q_BUCKET, K_BUCKET,
                CAUSAL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # int64: batch offsets of large tensors overflow int32
    h = bh % H
    # GQA: query head h reads kv head h // GROUP, by pointer, never by copying K and V
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + (h // GROUP) * stride_kh
    V += b * stride_vb + (h // GROUP) * stride_vh
    O += b * stride_ob + h * stride_oh
    LSE += bh.to(tl.int64) * Tq

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    # rows past Tq (the ragged last tile) load zeros and compute harmless garbage that is never stored
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=offs_m[:, None] < Tq, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Key tiles [0, full) are visible to every row of this query tile; [full, end) hold the causal
    # diagonal or the ragged end of the keys; keys from `end` on are hidden from every row.
    if CAUSAL:
        # query i sees keys j <= i + Tk - Tq: the first row (start_m) sees the fewest, the last the most
        end = tl.minimum(Tk, start_m + BLOCK_M + Tk - Tq)
        full = tl.minimum(Tk, start_m + 1 + Tk - Tq) // BLOCK_N * BLOCK_N
    else:
        end = Tk
        full = Tk // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, 0, full, offs_m, Tq, Tk, qk_scale,
                               False, CAUSAL, PRECISION, BLOCK_N, BLOCK_D)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, full, end, offs_m, Tq, Tk, qk_scale,
                               True, CAUSAL, PRECISION, BLOCK_N, BLOCK_D)

    # l = 0 only for a row that sees no key at all, impossible when Tq <= Tk; guard the division
    # anyway: such a row gets O = 0 and LSE = +inf, so its P = exp2(S - LSE) = 0 in the backward
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    tl.store(O + offs_m[:, None] * stride_ot + offs_d[None, :], o.to(O.dtype.element_ty), mask=offs_m[:, None] < Tq)
    lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.log2(l_safe))
    tl.store(LSE + offs_m, lse, mask=offs_m < Tq)


# ----------------------------------------------------------------------------------------------
# backward

@triton.jit
def _bwd_preprocess(O, dO, Delta, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
                    H, Tq, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """D_i = rowsum(dO * O) per query row: the softmax's Jacobian reduced to one number per row."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m[:, None] < Tq
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :], mask=rows, other=0.0)
    do = tl.load(dO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :], mask=rows, other=0.0)
    tl.store(Delta + bh.to(tl.int64) * Tq + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < Tq)


@triton.jit
def _bwd_dkdv_tiles(dk, dv, k, v, Q, dO, LSE, Delta, stride_qt, stride_dot, lo, hi, offs_n, Tq, Tk, qk_scale,
                    MASKED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Add the contributions of query tiles [lo, hi) of one head to dK, dV of one key tile.
    Works on transposed tiles (keys x queries) so that dV += P^T dO and dK += dS^T Q read P and dS
    as they come out of the matmuls."""
    offs_d = tl.arange(0, BLOCK_D)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        # rows past Tq load q = dO = 0, LSE = D = 0: their P^T is 1 but dP and dS are 0, and they
        # add P^T dO = 0 and dS^T Q = 0
        rows = offs_m < Tq
        q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=rows[:, None], other=0.0)
        do = tl.load(dO + offs_m[:, None] * stride_dot + offs_d[None, :], mask=rows[:, None], other=0.0)
        lse = tl.load(LSE + offs_m, mask=rows, other=0.0)
        delta = tl.load(Delta + offs_m, mask=rows, other=0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # S^T
        if MASKED:  # causal diagonal: query i sees key j iff j <= i + Tk - Tq
            sT = tl.where(offs_n[:, None] <= offs_m[None, :] + (Tk - Tq), sT, float("-inf"))
        pT = tl.exp2(sT - lse[None, :])  # P^T
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # dP^T
        dsT = pT * (dpT - delta[None, :])  # dS^T
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=_KEY)
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, dO, dK, dV, LSE, Delta,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                     stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                     H, H_kv, GROUP, Tq, Tk, sm_scale, qk_scale, Q_BUCKET, K_BUCKET,
                     CAUSAL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of one key tile of one kv head: sums over every query row of every query head in the
    kv head's group."""
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = (bhk // H_kv).to(tl.int64)
    hk = bhk % H_kv
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # key rows past Tk load zeros; their dK, dV rows are garbage that is never stored
    cols = offs_n[:, None] < Tk
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :], mask=cols, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :], mask=cols, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Query tiles before `lo` see none of these keys; [lo, mid) straddle the diagonal; from `mid` on
    # every row sees the whole key tile.
    if CAUSAL:
        # query i sees key j iff i >= j - (Tk - Tq)
        lo = tl.maximum(start_n - (Tk - Tq), 0) // BLOCK_M * BLOCK_M
        mid = (tl.maximum(start_n + BLOCK_N - 1 - (Tk - Tq), 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        mid = tl.minimum(mid, Tq)
    else:
        lo = 0
        mid = 0
    for g in range(GROUP):
        bh = b * H + hk * GROUP + g
        Qh = Q + b * stride_qb + (hk * GROUP + g) * stride_qh
        dOh = dO + b * stride_dob + (hk * GROUP + g) * stride_doh
        LSEh = LSE + bh * Tq
        Deltah = Delta + bh * Tq
        if CAUSAL:
            dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, Qh, dOh, LSEh, Deltah, stride_qt, stride_dot, lo, mid, offs_n,
                                     Tq, Tk, qk_scale, True, PRECISION, BLOCK_M, BLOCK_D)
        dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, Qh, dOh, LSEh, Deltah, stride_qt, stride_dot, mid, Tq, offs_n,
                                 Tq, Tk, qk_scale, False, PRECISION, BLOCK_M, BLOCK_D)

    dk *= sm_scale  # dK = scale * dS^T Q: the scale of S, applied once
    tl.store(dK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             dk.to(dK.dtype.element_ty), mask=cols)
    tl.store(dV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(dV.dtype.element_ty), mask=cols)


@triton.jit
def _bwd_dq_tiles(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, lo, hi, offs_m, Tq, Tk, qk_scale,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Add the contributions of key tiles [lo, hi) to dQ of one query tile."""
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = K + offs_n[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = V + offs_n[:, None] * stride_vt + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < Tk, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < Tk, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # S
        if MASKED:
            visible = offs_n[None, :] < Tk
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + (Tk - Tq))
            s = tl.where(visible, s, float("-inf"))
        p = tl.exp2(s - lse[:, None])  # P
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # dP
        ds = p * (dp - delta[:, None])  # dS
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=_KEY)
@triton.jit
def _bwd_dq_kernel(Q, K, V, dO, dQ, LSE, Delta,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                   stride_dqb, stride_dqh, stride_dqt,
                   H, GROUP, Tq, Tk, sm_scale, qk_scale, Q_BUCKET, K_BUCKET,
                   CAUSAL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one query tile: the same walk over key tiles as the forward."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    K += b * stride_kb + (h // GROUP) * stride_kh
    V += b * stride_vb + (h // GROUP) * stride_vh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m < Tq
    # rows past Tq: q = dO = 0 and LSE = D = 0 give dS = 0, and they are never stored
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :], mask=rows[:, None], other=0.0)
    do = tl.load(dO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :], mask=rows[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * Tq + offs_m, mask=rows, other=0.0)
    delta = tl.load(Delta + bh.to(tl.int64) * Tq + offs_m, mask=rows, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if CAUSAL:  # the forward's split: [0, full) unmasked, [full, end) on the diagonal
        end = tl.minimum(Tk, start_m + BLOCK_M + Tk - Tq)
        full = tl.minimum(Tk, start_m + 1 + Tk - Tq) // BLOCK_N * BLOCK_N
    else:
        end = Tk
        full = Tk // BLOCK_N * BLOCK_N
    dq = _bwd_dq_tiles(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, 0, full, offs_m, Tq, Tk, qk_scale,
                       False, CAUSAL, PRECISION, BLOCK_N, BLOCK_D)
    dq = _bwd_dq_tiles(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, full, end, offs_m, Tq, Tk, qk_scale,
                       True, CAUSAL, PRECISION, BLOCK_N, BLOCK_D)

    dq *= sm_scale  # dQ = scale * dS K
    tl.store(dQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(dQ.dtype.element_ty), mask=rows[:, None])


# ----------------------------------------------------------------------------------------------
# autograd and the public entry point

_LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))


def _bucket(n: int) -> int:
    return triton.next_power_of_2(n)


def _precision(t: torch.Tensor) -> str:
    # fp32 inputs: full-precision matmuls, not TF32 (10-bit mantissa), so fp32 means fp32;
    # fp16/bf16 ignore the setting
    return "ieee" if t.dtype == torch.float32 else "tf32"


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels assume the head dim is contiguous (stride 1); any other layout is passed by strides."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _s(t: torch.Tensor) -> tuple[int, int, int]:
    """Batch, head and time strides of a (B, H, T, D) tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


class FlashAttentionFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
        B, H, Tq, D = q.shape
        H_kv, Tk = k.shape[1], k.shape[2]
        # same memory layout as q where q is dense: a (B, T, H, D) buffer seen as (B, H, T, D) gives
        # an O the caller can view back as (B, T, H * D) without a copy
        o = torch.empty_like(q)
        lse = torch.empty((B, H, Tq), device=q.device, dtype=torch.float32)
        grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * H)
        _fwd_kernel[grid](q, k, v, o, lse, *_s(q), *_s(k), *_s(v), *_s(o),
                          H, H // H_kv, Tq, Tk, _LOG2E / math.sqrt(D), _bucket(Tq), _bucket(Tk),
                          CAUSAL=causal, PRECISION=_precision(q), BLOCK_D=D)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal = causal
        return o

    @staticmethod
    def backward(ctx, do: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        q, k, v, o, lse = ctx.saved_tensors
        do = _unit_stride(do)
        B, H, Tq, D = q.shape
        H_kv, Tk = k.shape[1], k.shape[2]
        sm_scale = 1.0 / math.sqrt(D)
        buckets, meta = (_bucket(Tq), _bucket(Tk)), dict(CAUSAL=ctx.causal, PRECISION=_precision(q), BLOCK_D=D)
        delta = torch.empty_like(lse)
        _bwd_preprocess[(triton.cdiv(Tq, _PRE_BLOCK_M), B * H)](o, do, delta, *_s(o), *_s(do), H, Tq,
                                                                 BLOCK_M=_PRE_BLOCK_M, BLOCK_D=D)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        grid = lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]), B * H_kv)
        _bwd_dkdv_kernel[grid](q, k, v, do, dk, dv, lse, delta, *_s(q), *_s(k), *_s(v), *_s(do), *_s(dk), *_s(dv),
                               H, H_kv, H // H_kv, Tq, Tk, sm_scale, sm_scale * _LOG2E, *buckets, **meta)
        grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * H)
        _bwd_dq_kernel[grid](q, k, v, do, dq, lse, delta, *_s(q), *_s(k), *_s(v), *_s(do), *_s(dq),
                             H, H // H_kv, Tq, Tk, sm_scale, sm_scale * _LOG2E, *buckets, **meta)
        return dq, dk, dv, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Fused attention, differentiable: q (B, H, Tq, D), k/v (B, H_kv, Tk, D) -> (B, H, Tq, D), with
    the conventions at the top of this file. Any strides; D in 32/64/128; fp16/bf16 (fp32 too) on a
    CUDA GPU, or on the CPU under TRITON_INTERPRET=1."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"flash_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit "
                         "q (B, H, Tq, D), k/v (B, H_kv, Tk, D)")
    if q.shape[1] % k.shape[1] or (causal and q.shape[2] > k.shape[2]) or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"flash_attention: needs H % H_kv == 0, Tq <= Tk when causal and one dtype; got "
                         f"q {tuple(q.shape)} {q.dtype}, k/v {tuple(k.shape)} {k.dtype}/{v.dtype}")
    D = q.shape[-1]
    if D not in HEAD_DIMS:
        raise user_error("attention.py", f"head dim {D} is not supported by the triton attention kernel",
                         "make n_embd / n_head 32, 64 or 128, or use attn_impl=sdpa")
    if not (q.is_cuda or INTERPRET):
        raise user_error("attention.py", f"attn_impl=triton needs a CUDA GPU, got tensors on {q.device}",
                         "use attn_impl=auto or sdpa")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise user_error("attention.py", f"the triton attention kernel does not run in {q.dtype}",
                         "use bf16, fp16 or fp32")
    return FlashAttentionFunction.apply(q, k, v, causal)
