"""The nanozh model: a Llama-style decoder in one file.

    python model.py --config configs/26m.json --vocab_size 16000    # parameter count per part

Pre-norm RMSNorm, rotary position embeddings (RoPE), grouped-query attention, SwiGLU MLP, no biases,
optionally tied input/output embeddings. Reads top-down: config, norm, RoPE, attention, MLP, block,
KV cache, the Transformer with forward/generate/save, then loading a model directory with the one
device/precision policy, and the sampling helpers.

    model = Transformer(ModelConfig(vocab_size=16000, n_layer=4, n_head=4, n_kv_head=2, n_embd=128))
    logits, loss = model(idx, targets)            # loss: mean cross entropy, targets == -1 ignored
    _, nll = model(idx, targets, reduction="none")  # (B, T) per-token NLL, 0 where ignored
    out = model.generate(idx, 100, temperature=0)  # greedy, with a KV cache
    model.save("out/m"); model = load_model("out/m")
    model, tok = load("out/sft/latest", device)   # + its tokenizer, checked, in eval mode (sample, eval)
"""

import argparse
import json
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from attention import HEAD_DIMS, attention
from errors import NanozhError, exit_on_user_error, user_error
from files import atomic_path, write_text_atomic
from tokenizer.tokenizer import Tokenizer

ATTN_IMPLS = ("auto", "triton", "sdpa", "naive")


@dataclass
class ModelConfig:
    vocab_size: int = 0          # the tokenizer's; 0 = not set yet (the trainer fills it in)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4           # < n_head is grouped-query attention; must divide n_head
    n_embd: int = 128
    ffn_hidden: int = 0          # SwiGLU hidden size; 0 = 8/3 * n_embd rounded up to a multiple of 64
    block_size: int = 256        # the context length: RoPE tables and the KV cache stop here
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # "auto" stays "auto" in config.json: it picks "triton" for CUDA fp16/bf16 inputs and "sdpa"
    # otherwise at each forward, so a checkpoint trained on a GPU samples on a CPU unchanged.
    attn_impl: str = "auto"
    init_std: float = 0.02
    dropout: float = 0.0
    # mixture of experts (0 = a dense MLP in every block): each token goes to the n_expert_active
    # (top-k) of n_expert routed SwiGLU experts of ffn_hidden each, plus n_shared_expert always-on
    # ones (DeepSeek-style); the router's load-balancing loss (Switch/Mixtral) and z-loss (ST-MoE)
    # join the training loss with these weights (see MoE and RouterLoss)
    n_expert: int = 0
    n_expert_active: int = 2
    n_shared_expert: int = 0
    router_aux_coef: float = 0.01
    router_z_coef: float = 0.0

    @property
    def padded_vocab_size(self) -> int:
        # embedding and head rows rounded up to a multiple of 64: a friendlier matmul shape on GPUs
        return -(-self.vocab_size // 64) * 64

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_size(self) -> int:
        return self.ffn_hidden or -(-(8 * self.n_embd) // (3 * 64)) * 64

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "model config") -> "ModelConfig":
        """Build from a dict (config.json, a preset's "model" section); unknown keys, values of the
        wrong type and inconsistent sizes are one-line errors naming `where`."""
        types = {f.name: f.type for f in fields(cls)}
        for key, value in d.items():
            if key not in types:
                raise user_error(where, f"unknown model config key {key!r}", f"known keys: {', '.join(types)}")
            want = types[key]
            ok = (isinstance(value, bool) if want is bool else
                  isinstance(value, int) and not isinstance(value, bool) if want is int else
                  isinstance(value, (int, float)) and not isinstance(value, bool) if want is float else
                  isinstance(value, str))
            if not ok:
                raise user_error(where, f"model config key {key!r} should be {want.__name__}, got {value!r}")
        config = cls(**d)
        config.check(where)
        return config

    def check(self, where: str = "model config") -> None:
        problems = [
            (self.vocab_size <= 0, "vocab_size is not set", "set it to the tokenizer's vocab_size"),
            (min(self.n_layer, self.n_head, self.n_kv_head, self.n_embd, self.block_size) <= 0,
             "n_layer, n_head, n_kv_head, n_embd and block_size must be positive", ""),
            (self.ffn_hidden < 0, f"ffn_hidden {self.ffn_hidden} is negative", "0 derives it from n_embd"),
            (min(self.rope_theta, self.norm_eps, self.init_std) <= 0, "rope_theta, norm_eps and init_std must be positive", ""),
            (self.n_embd % self.n_head != 0, f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}", ""),
            (self.n_head % self.n_kv_head != 0, f"n_kv_head {self.n_kv_head} does not divide n_head {self.n_head}", ""),
            (self.head_dim % 2 != 0, f"head_dim n_embd/n_head = {self.head_dim} is odd", "RoPE rotates pairs"),
            (self.attn_impl not in ATTN_IMPLS, f"attn_impl {self.attn_impl!r} is unknown", f"use one of {ATTN_IMPLS}"),
            (not 0.0 <= self.dropout < 1.0, f"dropout {self.dropout} is outside [0, 1)", ""),
            (self.n_expert < 0 or self.n_shared_expert < 0, "n_expert and n_shared_expert must not be negative", ""),
            (self.n_expert > 0 and not 1 <= self.n_expert_active <= self.n_expert,
             f"n_expert_active {self.n_expert_active} is outside 1..n_expert ({self.n_expert})", "top-k picks k of the experts"),
            (self.n_expert == 0 and self.n_shared_expert > 0, "n_shared_expert needs routed experts",
             "set n_expert > 0, or leave both 0 for a dense MLP"),
            (min(self.router_aux_coef, self.router_z_coef) < 0, "router_aux_coef and router_z_coef must not be negative", ""),
        ]
        for bad, what, fix in problems:
            if bad:
                raise user_error(where, what, fix)


# ----------------------------------------------------------------------------------------------
# layers

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32: the mean of squares loses too much in bf16
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Linear(nn.Linear):
    """A bias-free nn.Linear that multiplies through `linear`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T, as F.linear; but one row in fp32 on the CPU under torch.compile (a batch-1 decode
    step of compile_for_generation) is written as a multiply and a sum over the inputs. Inductor
    turns that into a loop of its own, fused with what comes before (the norm), that reads each
    weight row once; MKL's matrix-vector kernel is slower at nanozh's sizes (measured on the 2-core
    AMD EPYC VM, one thread, the 17 products of a 4 x 256, vocab 8192 decode step back to back:
    0.84-1.08 ms with F.linear, 0.52-0.65 ms as compiled loops). Eager mode keeps F.linear: there
    the multiply would first write the whole product to memory."""
    if (torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and x.shape[:-1].numel() == 1):
        return (x.unsqueeze(-2) * weight).sum(-1)
    return F.linear(x, weight)


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, (length, head_dim / 2), computed in fp64, kept in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x[i], x[i + D/2]) pair of x (..., T, D) by its position's angle, in fp32.
    The product of a rotated query and key then depends only on their distance."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head, self.head_dim = layer, config.n_head, config.n_kv_head, config.head_dim
        self.attn_impl = config.attn_impl
        # q, k and v in one matmul: one large GEMM beats three small ones
        self.qkv = Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_dim)
        self.proj = Linear(config.n_head * config.head_dim, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: "KVCache | None") -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qk, v = self.qkv(x).view(B, T, H + 2 * Hkv, D).transpose(1, 2).split([H + Hkv, Hkv], dim=1)
        # the query and key heads rotated in one pass: half the small ops, which a one-token decode
        # step is made of (the same values as rotating each)
        q, k = apply_rope(qk, cos, sin).split([H, Hkv], dim=1)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # all keys so far; the new queries are the last T
        if cache is not None and cache.mask is not None:
            # rows at different positions (continuous batching): each row's own causal mask, which
            # only sdpa takes (the Triton kernel assumes one length for every row)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask, enable_gqa=H != Hkv)
        else:
            y = attention(q, k, v, causal=True, impl=resolve_attn_impl(self.attn_impl, q))
        return self.dropout(self.proj(y.transpose(1, 2).reshape(B, T, H * D)))


def resolve_attn_impl(impl: str, q: torch.Tensor) -> str:
    """"auto" -> the fused Triton kernel where it pays (CUDA, fp16/bf16, its head dims), else sdpa.
    Decided per call from the tensors, not at construction: models are built on the CPU, then moved."""
    if impl != "auto":
        return impl
    fits_triton = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in HEAD_DIMS
    return "triton" if fits_triton else "sdpa"


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up in one matmul. `hidden` (default
    config.hidden_size) is widened for MoE's shared experts."""

    def __init__(self, config: ModelConfig, hidden: int = 0):
        super().__init__()
        hidden = hidden or config.hidden_size
        self.gate_up = Linear(config.n_embd, 2 * hidden)
        self.down = Linear(hidden, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.dropout(self.down(F.silu(gate) * up))


class RouterLoss(torch.autograd.Function):
    """How the router's losses join every script's training loss without changing a value: the
    forward returns y as it is; the backward passes y's gradient through and gives `loss` the
    gradient `scale`, which is what adding scale * loss to the script's loss would have done.
    Pretraining, SFT, DPO and RL thus all train the router whatever they make of the logits, and
    the per-token NLL that DPO's log-probs and eval's bits per character read stays pure cross
    entropy (DeepSeek-V2's AddAuxiliaryLoss works the same way). `scale` is the factor the script
    puts on its own loss before backward: 1 / grad_accum, times the fp16 GradScaler's scale (the
    trainer keeps it current with Transformer.set_router_loss_scale; 1 for a plain loss.backward())."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, loss: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        (scale,) = ctx.saved_tensors
        return grad_y, scale.float().clone(), None


class MoE(nn.Module):
    """Token-choice top-k mixture of SwiGLU experts, written to be read:

    1. the router scores every expert for every token (in fp32); each token keeps the softmax
       weights of its k best experts, renormalised to sum to 1;
    2. the N * k (token, expert) choices are sorted by expert, so each expert's tokens form one
       slice of the gathered rows, and each expert runs on its slice (one no token chose runs on an
       empty slice: its gradient is then zeros rather than missing, which DDP needs);
    3. each output, times its weight, is added back onto its token's row (index_add_).
    Shared experts run on every token, as one MLP n_shared_expert times as wide (the same sum).

    A fused version keeps step 2's sorted layout but replaces the loop over experts by one grouped
    GEMM over all slices (torch._grouped_mm, megablocks) that reads the counts on the device; here
    counts.tolist() waits for the device once per layer and each expert is its own small matmul.
    Expert parallelism would turn the sort into an all-to-all between the GPUs holding the experts.

    In a training forward (grad enabled), the Switch load-balancing loss E * sum_e f_e * P_e (f_e:
    expert e's share of the N * k choices, P_e: its mean router probability; 1 when either is
    uniform, E / k when every token goes to the same k experts) and the ST-MoE z-loss mean(logsumexp(logits)^2), with
    their coefficients and averaged over layers, go into the backward through RouterLoss; their
    values and the tokens per expert are summed in self.stats for Transformer.router_stats()."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.router = Linear(config.n_embd, config.n_expert)
        self.experts = nn.ModuleList([MLP(config) for _ in range(config.n_expert)])
        self.shared = MLP(config, config.n_shared_expert * config.hidden_size) if config.n_shared_expert else None
        # the factor on the router losses' gradient (see RouterLoss); a buffer so that changing it
        # does not recompile a torch.compile'd model
        self.register_buffer("loss_scale", torch.ones(()), persistent=False)
        self.stats: torch.Tensor | None = None  # per expert: tokens; then aux, z, forwards

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C) -> the router's fp32 logits (N, E), each token's k experts (N, k) and their
        weights (N, k): the softmax over all experts, renormalised over the chosen k."""
        logits = self.router(x).float()
        weights, chosen = logits.softmax(dim=-1).topk(self.config.n_expert_active, dim=-1)
        return logits, chosen, weights / weights.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        E, k = self.config.n_expert, self.config.n_expert_active
        x = x.reshape(B * T, C)
        logits, chosen, weights = self.route(x)
        flat = chosen.flatten()                               # (N * k,) the expert of each choice
        order = flat.argsort(stable=True)                     # choices grouped by expert
        rows = order // k                                     # the token of each sorted choice
        counts = torch.bincount(flat, minlength=E)            # tokens per expert
        slices = x[rows].split(counts.tolist())
        out = torch.cat([expert(piece) for expert, piece in zip(self.experts, slices)])
        y = torch.zeros(B * T, C, device=x.device).index_add_(0, rows, out.float() * weights.flatten()[order, None])
        if self.shared is not None:
            y = y + self.shared(x).float()
        if self.training and torch.is_grad_enabled():
            aux = E * (counts.float() / flat.numel() * logits.softmax(dim=-1).mean(dim=0)).sum()
            z = torch.logsumexp(logits, dim=-1).pow(2).mean()
            loss = (self.config.router_aux_coef * aux + self.config.router_z_coef * z) / self.config.n_layer
            y = RouterLoss.apply(y, loss, self.loss_scale)
            stats = torch.cat([counts.float(), torch.stack([aux, z]).detach(), torch.ones(1, device=x.device)])
            self.stats = stats if self.stats is None else self.stats + stats
        return y.to(x.dtype).view(B, T, C)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config, layer)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MoE(config) if config.n_expert else MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: "KVCache | None") -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return x + self.mlp(self.mlp_norm(x))


class KVCache:
    """Keys and values of every layer for `batch_size` sequences of up to `max_len` positions.

    Each layer's (B, n_kv_head, max_len, head_dim) buffers are allocated at its first write, in the
    dtype attention computes in (the weights' dtype, or the autocast dtype). Two ways to fill it:
    - every row at the same position (generate): `pos` counts the filled positions; the model
      advances it after each forward;
    - each row at its own position (serve.py's continuous batching, where a request joins or
      leaves the batch at any step): `lengths[row]` counts that row's filled positions, and a
      forward with `rows` continues just those rows (see Transformer.forward)."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int):
        self.shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k: list[torch.Tensor | None] = [None] * config.n_layer
        self.v: list[torch.Tensor | None] = [None] * config.n_layer
        self.pos = 0
        self.lengths = [0] * batch_size
        # set only during a forward with rows: the rows, their new tokens' positions (B, T), the
        # keys they read (end) and the attention mask (B, 1, T, end)
        self.rows: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.end = 0
        self.mask: torch.Tensor | None = None

    def begin_rows(self, rows: list[int], T: int, device: torch.device) -> torch.Tensor:
        """Start a forward that continues each of `rows` by T tokens; returns their positions (B, T)."""
        starts = torch.tensor([self.lengths[r] for r in rows], device=device)
        self.rows = torch.tensor(rows, device=device)
        self.positions = starts[:, None] + torch.arange(T, device=device)
        self.end = max(self.lengths[r] for r in rows) + T
        # query t of row b sees keys 0 .. positions[b, t]: its own past, never the keys past its
        # length (padding for a shorter row, or what the row's previous request left behind)
        self.mask = torch.arange(self.end, device=device) <= self.positions[:, None, :, None]
        return self.positions

    def end_rows(self, rows: list[int], T: int) -> None:
        for r in rows:
            self.lengths[r] += T
        self.rows = self.positions = self.mask = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(self.shape)
            self.v[layer] = v.new_zeros(self.shape)
        if self.rows is not None:
            # row b's T new keys go to positions[b]; advanced indexing puts the (B, T) index dims first
            self.k[layer][self.rows[:, None], :, self.positions] = k.transpose(1, 2)
            self.v[layer][self.rows[:, None], :, self.positions] = v.transpose(1, 2)
            return self.k[layer][self.rows, :, :self.end], self.v[layer][self.rows, :, :self.end]
        # narrow, not [:, :, a:b]: one op instead of three slices, and a decode step is made of small ops
        T, end = k.shape[2], self.pos + k.shape[2]
        self.k[layer].narrow(2, self.pos, T).copy_(k)
        self.v[layer].narrow(2, self.pos, T).copy_(v)
        return self.k[layer].narrow(2, 0, end), self.v[layer].narrow(2, 0, end)


# ----------------------------------------------------------------------------------------------
# the model

class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.check("ModelConfig")
        self.config = config
        self.tok_emb = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = Linear(config.n_embd, config.padded_vocab_size)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # RoPE tables: precomputed once, non-persistent (rebuilt, never saved), fp32 (see _apply)
        cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.adapter = None  # a lora.Adapter once LoRA adapters are on: save() then writes only them
        self.compiled_for_generation = False  # set by compile_for_generation (generate's cache size)
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2's recipe, as nanoGPT and most small Llama reproductions use it: every matrix
        N(0, init_std), and the two projections that write into the residual stream (attention out,
        MLP down) scaled by 1/sqrt(2 * n_layer), so the residual's variance stays O(1) however deep
        the stack (each of the 2 * n_layer branches adds its share). Norm gains start at 1."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "down.weight")):  # the MLP's, or each expert's
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer))
            elif p.dim() == 2:
                nn.init.normal_(p, 0.0, std)
            else:
                nn.init.ones_(p)

    def _apply(self, *args, **kwargs):
        # .to(), .cuda(), .half() all run through here. They would cast the RoPE tables to the new
        # dtype too (bf16 angles are off by ~0.4% at position 2048), so rebuild them in fp32.
        super()._apply(*args, **kwargs)
        cos, sin = rope_tables(self.config.head_dim, self.config.block_size, self.config.rope_theta)
        self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)
        return self

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean",
                cache: KVCache | None = None, rows: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits, loss).

        With targets (B, T): logits (B, T, vocab_size) and the fp32 cross entropy over positions whose
        target is not -1, as a mean (reduction="mean") or per position (reduction="none", (B, T), 0
        where ignored: sum it under a mask for DPO log-probs or eval NLL). Without targets: logits of
        the last position only, (B, 1, vocab_size), loss None: generation needs nothing more.
        With a cache, idx continues the cached sequence: positions start at cache.pos. With a cache
        and rows (one cache row per row of idx), each row continues its own cached sequence from
        cache.lengths[row]: the rows of a continuous batch, each at its own position.
        Logits cover the tokenizer's vocab_size only, never the padding rows."""
        B, T = idx.shape
        start = cache.pos if cache is not None and rows is None else 0
        end = max(cache.lengths[r] for r in rows) + T if rows is not None else start + T
        if end > self.config.block_size:
            raise user_error("model", f"sequence of {end} tokens is longer than block_size {self.config.block_size}",
                             "use shorter sequences or a model with a larger block_size")
        if rows is not None:
            pos = cache.begin_rows(rows, T, idx.device)
            cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]  # (B, 1, T, D/2): per row
        else:
            cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
        x = self.tok_emb(idx)
        for block in self.blocks:
            x = block(x, cos, sin, cache)
        if rows is not None:
            cache.end_rows(rows, T)
        elif cache is not None:
            cache.pos += T
        x = self.norm(x)
        V = self.config.vocab_size
        if targets is None:
            return self.lm_head(x[:, -1:, :])[..., :V], None
        logits = self.lm_head(x)[..., :V]
        loss = F.cross_entropy(logits.float().reshape(B * T, V), targets.reshape(B * T), ignore_index=-1,
                               reduction=reduction)
        if reduction == "none":
            loss = loss.view(B, T)
        return logits, loss

    # ------------------------------------------------------------------------------------------
    # generation

    @torch.inference_mode()  # no_grad, and no version counters or view tracking: less work per small op
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                        stop_ids: list[int] | None = None, generator: torch.Generator | None = None,
                        seed: int | None = None, use_cache: bool = True) -> Iterator[torch.Tensor]:
        """Yield the next token of each row, (B,), one step at a time (streaming chat reads these).

        idx (B, T) is one prompt or several of equal length. Greedy at temperature 0; otherwise
        sampled in fp32 from temperature-scaled, top-k / top-p filtered probabilities, drawn from
        `generator` (or a fresh one seeded with `seed`) so a seed reproduces a sample. Stops after
        max_new_tokens, when the sequence fills the context (block_size: there is no sliding window,
        positions past it were never trained), or once every row has produced one of stop_ids; a
        row that stopped earlier repeats its stop id. Call model.eval() first if dropout > 0."""
        B, T = idx.shape
        check_sampling(temperature, top_k, top_p, repetition_penalty)
        if T == 0:
            raise user_error("generate", "the prompt is empty", "give at least one token")
        if T > self.config.block_size:
            raise user_error("generate", f"prompt is {T} tokens but the model's context is {self.config.block_size}",
                             "shorten the prompt")
        if generator is None and seed is not None:
            generator = torch.Generator(device=idx.device).manual_seed(seed)
        steps = min(max_new_tokens, self.config.block_size - T)
        # a compiled model gets room for the whole context, not just T + steps: every call's cache
        # then has the same shape, and nothing compiles again; eager callers (GRPO's rollouts, a
        # batch of rows each) keep the memory for what they generate
        cache_len = self.config.block_size if self.compiled_for_generation else T + steps
        cache = KVCache(self.config, B, cache_len) if use_cache else None
        seen = None
        if repetition_penalty != 1.0:
            seen = torch.zeros(B, self.config.vocab_size, dtype=torch.bool, device=idx.device).scatter_(1, idx, True)
        stop = torch.tensor(stop_ids or [], dtype=idx.dtype, device=idx.device)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        seq, last = idx, idx[:, -1]
        for _ in range(steps):
            # with a cache: the whole prompt once (prefill), then only the newest token; without
            # one, the whole sequence every step
            logits, _ = self(seq, cache=cache)
            logits = logits[:, -1].float()
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if stop_ids:  # skipped without stop ids: no row can stop, and each op costs a decode step ~1%
                nxt = torch.where(done, last, nxt)
                done |= torch.isin(nxt, stop)
            if seen is not None:
                seen.scatter_(1, nxt[:, None], True)
            seq = nxt[:, None] if cache is not None else torch.cat([seq, nxt[:, None]], dim=1)
            last = nxt
            yield nxt
            if stop_ids and done.all():
                return

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, **kwargs) -> torch.Tensor:
        """idx (B, T) -> (B, T + n): the prompt followed by up to max_new_tokens new tokens.
        Options as in generate_stream (repetition_penalty, stop_ids, generator, seed, use_cache)."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, **kwargs))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1)

    # ------------------------------------------------------------------------------------------
    # sizes

    def param_counts(self) -> dict[str, int]:
        """Parameters per part (an MoE's router and experts are "mlp"); a tied head counts 0 (its
        matrix is the embedding's); total; and active, those one token computes with: an MoE layer
        runs n_expert_active of its n_expert routed experts (dense: active == total)."""
        counts = {"embedding": 0, "attention": 0, "mlp": 0, "norms": 0, "head": 0}
        for name, p in self.named_parameters():  # shared tensors are listed once, under tok_emb
            part = ("embedding" if name.startswith("tok_emb") else "head" if name.startswith("lm_head") else
                    "attention" if ".attn." in name else "mlp" if ".mlp." in name else "norms")
            counts[part] += p.numel()
        counts["total"] = sum(counts.values())
        counts["active"] = counts["total"] - self.idle_expert_params()
        return counts

    def idle_expert_params(self) -> int:
        """Parameters of the routed experts a token does not run: (n_expert - k) per MoE layer."""
        c = self.config
        return c.n_layer * max(0, c.n_expert - c.n_expert_active) * 3 * c.n_embd * c.hidden_size

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), the PaLM appendix B / nanoGPT estimate:
        6 * N for the matmuls, N = attention + MLP + LM-head matrices (the head's matmul runs
        whether or not it is tied; the embedding lookup and norms are not matmuls), plus
        12 * n_layer * n_embd * seq_len for QK^T and AV (full, not halved for the causal mask, as
        the convention has it, so MFU compares with other reports). An MoE counts the router and
        the experts a token runs (its active parameters), not the idle ones."""
        c = self.param_counts()
        n = c["attention"] + c["mlp"] - self.idle_expert_params() + self.config.padded_vocab_size * self.config.n_embd
        return 6 * n + 12 * self.config.n_layer * self.config.n_embd * seq_len

    # ------------------------------------------------------------------------------------------
    # mixture of experts: what the trainer reads and sets (no-ops for a dense model)

    def router_stats(self) -> dict[str, torch.Tensor]:
        """The routers' side of the training forwards since the last call, then a reset: aux_loss
        and z_loss (means over layers and forwards, before their coefficients) and expert_frac
        (n_layer, n_expert), each expert's share of its layer's choices: 1 / n_expert each when
        balanced, one near 1 when routing has collapsed. {} for a dense model or before any."""
        moes = [block.mlp for block in self.blocks if isinstance(block.mlp, MoE)]
        if not moes or moes[0].stats is None:
            return {}
        stats = torch.stack([m.stats for m in moes])          # (n_layer, n_expert + 3)
        for m in moes:
            m.stats = None
        counts, aux, z, forwards = stats[:, :-3], stats[:, -3], stats[:, -2], stats[:, -1]
        return {"aux_loss": (aux / forwards).mean(), "z_loss": (z / forwards).mean(),
                "expert_frac": counts / counts.sum(dim=-1, keepdim=True)}

    def set_router_loss_scale(self, scale: float) -> None:
        """The factor a training script puts on its loss before backward (see RouterLoss)."""
        for block in self.blocks:
            if isinstance(block.mlp, MoE):
                block.mlp.loss_scale.fill_(scale)

    # ------------------------------------------------------------------------------------------
    # model directories

    def save(self, out_dir: str | os.PathLike) -> None:
        """Write out_dir/model.safetensors and out_dir/config.json, each via a temp file + rename, so a
        kill mid-save leaves the previous files whole. A tied head is stored once (as tok_emb)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.adapter is not None:  # a LoRA model: its adapters and the base they belong to (lora.py)
            self.adapter.save(self, out_dir)
        else:
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                     if not (self.config.tie_embeddings and k == "lm_head.weight")}
            with atomic_path(out_dir / "model.safetensors") as tmp:
                save_file(state, tmp, metadata={"format": "pt"})
        write_text_atomic(out_dir / "config.json", json.dumps(self.config.to_dict(), indent=2) + "\n")


def load_model(model_dir: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> Transformer:
    """Read a model directory written by Transformer.save (safetensors: weights only, no pickle).
    A missing or broken directory is a one-line NanozhError naming the file and the fix."""
    model_dir = Path(model_dir)
    config_path, weights_path = model_dir / "config.json", model_dir / "model.safetensors"
    if not model_dir.is_dir():
        raise user_error(model_dir, "model directory not found", "pass a directory written by training")
    if (model_dir / "adapter_config.json").is_file():  # a LoRA adapter directory: its base + the adapters
        import lora  # here, not at the top: lora.py builds on this module
        return lora.load(model_dir, device, dtype)
    for path in (config_path, weights_path):
        if not path.is_file():
            raise user_error(path, "missing", "a model directory holds config.json and model.safetensors")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise user_error(config_path, f"not valid JSON ({e})", "restore it from the checkpoint") from None
    if not isinstance(raw, dict):
        raise user_error(config_path, "should hold a JSON object of model settings")
    config = ModelConfig.from_dict(raw, where=str(config_path))
    try:
        state = load_file(weights_path, device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for broken files
        raise user_error(weights_path, f"cannot be read, truncated or corrupted ({str(e).splitlines()[0]})",
                         "restore it from another checkpoint") from None
    model = Transformer(config)
    expected = {k: v for k, v in model.state_dict().items() if not (config.tie_embeddings and k == "lm_head.weight")}
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise user_error(weights_path, f"weights do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})",
                         "the config and weights come from different models")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise user_error(weights_path, f"{name} has shape {tuple(tensor.shape)} but config.json implies "
                             f"{tuple(expected[name].shape)}", "the config and weights come from different models")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise user_error(weights_path, f"{name} contains NaN or inf", "training diverged before this save; use an earlier checkpoint")
    model.load_state_dict(state, strict=False)  # strict=False only because a tied head is not stored
    return model.to(device=device, dtype=dtype)


def load(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Transformer, Tokenizer]:
    """The model of a model directory and its tokenizer, checked against each other: what sample.py,
    eval.py and every later tool load. fp32 weights on `device`, in eval mode; compute under
    autocast(device, dtype) (see pick_dtype for the policy)."""
    tok_path = Path(model_dir) / "tokenizer.model"
    if Path(model_dir).is_dir() and not tok_path.is_file():
        raise user_error(tok_path, "missing", "copy in the tokenizer.model the model was trained with")
    model = load_model(model_dir, device=device)
    tok = Tokenizer(tok_path)  # checks the special tokens sit at ids 0..5
    if tok.vocab_size != model.config.vocab_size:
        raise user_error(tok_path, f"tokenizer has {tok.vocab_size} tokens but the model was trained with "
                         f"{model.config.vocab_size}", "use the tokenizer.model saved with this checkpoint")
    return inference_layout(model.eval()), tok


def inference_layout(model: Transformer) -> Transformer:
    """On the CPU, store every Linear weight column-major: the same (out, in) shape and values, the
    memory of its transpose (W.t().contiguous().t()). A decode step multiplies one row by each
    weight, and MKL's kernel for that is faster on the transposed layout (measured on the 2-core
    AMD EPYC VM, one thread: the 8256 x 256 head 228 -> 155 us, the 1408 x 256 gate_up 39 -> 30 us).
    Another kernel may round differently in the last bits, so training keeps the plain layout and
    only inference (load, bench.sample) uses this; a tied head re-lays out the embedding with it.
    GPUs are left as they are (not measured there). save() writes contiguous copies either way."""
    if next(model.parameters()).device.type == "cpu":
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.data = module.weight.data.t().contiguous().t()
    return model


def compile_for_generation(model: Transformer) -> Transformer:
    """torch.compile the model in place for generation (sample.py --compile, bench.sample), and
    compile it now: two short prompts of different lengths generate a few tokens each, which
    compiles the prefill and the decode step for any length from 2 tokens (a 1-token prompt, or
    another batch size, compiles once more when it first comes). Call it under the autocast that
    generation will run in (autocast is part of what a graph was compiled for: another one compiles
    again), and change nothing in the model afterwards (see the guards below).

    Why: a one-token decode step is ~200 small ops in eager mode, and on a CPU their dispatch
    overhead costs as much as the matmuls at nanozh's sizes; inductor fuses what lies between the
    matmuls (norms, RoPE, cache writes, SwiGLU) into a few kernels, and on the CPU the one-row
    matmuls into them too, as loops of its own (see linear). Shapes start static, and a size seen to
    change (the cache position, the prompt length) becomes symbolic on the next compile,
    which then serves every value of it; generate then gives its cache the context's full shape. On
    the CPU, cpp_wrapper calls the kernels from generated C++ instead of Python. Before each call
    torch checks guards, that what the graph was compiled for still holds; those on the modules'
    attributes (dropout rates, the training flag) were half of the ~0.2 ms they took per decode
    step, and are skipped: a model compiled for generation stays as it is (the weights are
    inputs, and their values are always read afresh). Compiling takes ~10-30 s on a 2-core CPU,
    less on a later run (inductor caches on disk). Greedy output is the eager model's (tested); a
    sampled token can differ where two probabilities differ only in their last bits."""
    if model.config.n_expert:
        # measured on moe-tiny: torch stopped compiling after 8 graphs and ran the rest eagerly
        raise user_error("--compile", "a mixture-of-experts model is not compiled for generation",
                         "run it without --compile: its routing gives each expert a different number of "
                         "tokens at each step, and every new count would compile again")
    device = next(model.parameters()).device
    for p in model.parameters():  # linear()'s loop reads weights row by row: undo inference_layout
        p.data = p.data.contiguous()
    model.compiled_for_generation = True
    model.compile(options={"cpp_wrapper": device.type == "cpu",
                           "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
    for length in (2, 3):
        model.generate(torch.zeros(1, length, dtype=torch.long, device=device), 3, temperature=0)
    return model


def check_fits(ids: list[int], model: Transformer, where: str) -> None:
    """A prompt must leave room in the context for at least one generated token."""
    ctx = model.config.block_size
    if len(ids) >= ctx:
        raise user_error(where, f"prompt is {len(ids)} tokens but the model's context is {ctx}",
                         "shorten the prompt: at least one token of the context must be left for the answer")


# ----------------------------------------------------------------------------------------------
# device and precision: one policy for training, sampling and evaluation
#
# Weights stay fp32 everywhere; the matmuls run in `dtype` under autocast. Training keeps fp32
# master weights for the optimizer anyway, and running inference the same way means eval.py's
# bits per character equal training's validation loss and sample.py's greedy answer is the one
# eval.py --chat_prompts writes, on the same device. The price, 2x the weight memory of casting
# them to bf16, is small at nanozh's sizes (a 200M model: 0.8 GB). Autocast is per thread: code
# that runs the model on another thread (a server's scheduler) enters it there.

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """auto: cuda, else Apple's mps, else cpu; or any device torch knows ("cuda:1")."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise user_error("--device", f"{name!r} is not a device", "use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise user_error("--device", f"{name} but no CUDA device is available", "use --device=cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise user_error("--device", "mps but this machine has no Apple GPU", "use --device=cpu")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype. auto: bfloat16 on CUDA (float16 on GPUs without bf16, with a GradScaler
    in training), float32 elsewhere: CPU autocast is slower than fp32 on most CPUs, and mps's is
    not reliable across torch versions."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise user_error("--dtype", f"{name!r} is not supported", "use auto, bfloat16, float16 or float32")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision: fp32 weights, matmuls in dtype; float32 means no autocast at all."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# sampling helpers (fp32 logits (B, V) in, token ids (B,) out)

def check_sampling(temperature: float, top_k: int | None, top_p: float | None, repetition_penalty: float) -> None:
    if temperature < 0:
        raise user_error("generate", f"temperature {temperature} is negative", "use 0 for greedy, or > 0")
    if top_k is not None and top_k < 1:
        raise user_error("generate", f"top_k {top_k} is below 1", "leave it unset to disable")
    if top_p is not None and not 0 < top_p <= 1:
        raise user_error("generate", f"top_p {top_p} is outside (0, 1]", "leave it unset to disable")
    if repetition_penalty <= 0:
        raise user_error("generate", f"repetition_penalty {repetition_penalty} is not positive", "1.0 disables it")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on every token already in the sequence: positive logits divided by it, negative
    ones multiplied, so penalty > 1 always makes a repeat less likely."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of logits (B, V): the argmax at temperature 0; otherwise drawn from
    softmax(logits / temperature) restricted to the top_k most likely tokens (exactly k, ties at the
    k-th broken by torch.topk), then to the nucleus of what is left: the smallest set of most likely
    tokens whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        # keep the k by index, not by value: `logits < kth` would keep every token tied with the k-th
        best = torch.topk(logits, top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(1, best.indices, best.values)
    if top_p is not None and top_p < 1:
        # nucleus: keep the most likely tokens until their mass reaches top_p (at least one)
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ----------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description="Print a preset's parameter count per part.")
    parser.add_argument("--config", required=True, help="a preset such as configs/26m.json, or a model directory's config.json")
    parser.add_argument("--vocab_size", type=int, default=None, help="the tokenizer's (default: the preset's, else 16000)")
    args = parser.parse_args()
    try:
        path = Path(args.config)
        if not path.is_file():
            raise user_error(path, "config file not found", "see configs/ for the presets")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise user_error(path, f"not valid JSON ({e})") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("model", {}), dict):
            raise user_error(path, "should hold a JSON object", "a preset {\"model\": {...}} or a model's config.json")
        model_cfg = dict(raw.get("model", raw))  # a preset's "model" section, or a model directory's config.json
        if args.vocab_size is not None or not model_cfg.get("vocab_size"):
            model_cfg["vocab_size"] = args.vocab_size or 16000
        config = ModelConfig.from_dict(model_cfg, where=str(path))
        with torch.device("meta"):  # counting needs shapes, not memory or an init
            model = Transformer(config)
    except NanozhError as e:
        exit_on_user_error(e)
    counts = model.param_counts()
    print(f"{path}: vocab {config.vocab_size} (padded {config.padded_vocab_size}), {config.n_layer} layers, "
          f"n_embd {config.n_embd}, heads {config.n_head}/{config.n_kv_head} kv, ffn {config.hidden_size}, "
          f"block {config.block_size}, tied {config.tie_embeddings}")
    if config.n_expert:
        print(f"  mixture of experts: top-{config.n_expert_active} of {config.n_expert} experts of ffn "
              f"{config.hidden_size}, {config.n_shared_expert} shared; active = the parameters one token runs")
    for part, n in counts.items():
        print(f"  {part:<10} {n:>13,}  {n / 1e6:8.2f}M")
    print(f"  training FLOPs/token at T={config.block_size}: {model.flops_per_token(config.block_size) / 1e6:.1f}M")


if __name__ == "__main__":
    main()
