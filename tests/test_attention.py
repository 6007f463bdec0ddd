"""The fused Triton attention kernel (attention.flash_attention) against the naive reference.

Without a GPU the kernels run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1) in fp32; on a GPU the same tests run compiled, in bf16, and also on head dim 128
and sequences up to 4096 (GPU_CASES). NANOZH_TEST_DTYPE=fp16 (or bf16, fp32) picks another dtype:
bench/gpu_check.py runs the file in bf16 and in fp16. Ground truth is the naive path in fp64. A
kernel result passes when its error is within twice the error of the naive formula evaluated in
the same dtype, plus a small floor: a tolerance that follows the dtype."""

import os

import pytest
import torch

import attention
from attention import flash_attention, naive_attention
from errors import NanozhError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter computes with numpy, which has fp16 but no bf16
DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
    os.environ.get("NANOZH_TEST_DTYPE", "bf16" if DEVICE == "cuda" else "fp32")]
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}[DTYPE]

# (B, H, H_kv, Tq, Tk, D, causal). Every value of every axis appears: T in {1, 17, 64, 130} (one
# tile, ragged tails, tile-aligned, several tiles), Tq < Tk (prefill onto a KV cache, one-token
# decode), D in {32, 64}, H_kv in {H, H/2, 1}, causal and not; and the combinations that share
# code paths: GQA with causal masking on ragged lengths, GQA with Tq < Tk.
CASES = [
    (1, 2, 2, 1, 1, 32, True),
    (1, 2, 2, 17, 17, 64, True),
    (2, 4, 2, 17, 17, 32, False),
    (1, 4, 1, 64, 64, 64, True),
    (2, 2, 2, 64, 64, 32, False),
    (1, 4, 2, 130, 130, 32, True),
    (1, 2, 1, 130, 130, 64, False),
    (1, 4, 2, 17, 130, 64, True),
    (1, 2, 2, 1, 64, 32, True),
    (1, 2, 1, 33, 64, 32, False),
]
# Compiled on a GPU the same axes at real sizes: head dim 128, thousands of keys, ragged tails and
# Tq < Tk far from tile edges. Too slow for the interpreter.
GPU_CASES = [
    (2, 8, 2, 1024, 1024, 128, True),
    (1, 4, 4, 4096, 4096, 128, True),
    (1, 4, 1, 4096, 4096, 64, False),
    (1, 8, 2, 1000, 3000, 128, True),
    (2, 4, 2, 2049, 2049, 128, False),
    (4, 8, 2, 1, 4096, 128, True),
]
if DEVICE == "cuda":
    CASES += GPU_CASES


def make_inputs(B: int, H: int, H_kv: int, Tq: int, Tk: int, D: int, scale: float = 1.0, seed: int = 0):
    """q, k, v and an upstream gradient dO, in fp64 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64) * scale
    k = torch.randn(B, H_kv, Tk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H_kv, Tk, D, generator=g, dtype=torch.float64)
    do = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64)
    return q, k, v, do


def run(fn, q, k, v, do, causal: bool, dtype: torch.dtype, device: str = DEVICE) -> list[torch.Tensor]:
    """O, dQ, dK, dV of fn in dtype on device, returned in fp64 on the CPU."""
    xs = [t.detach().to(device, dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*xs, causal)
    out.backward(do.to(device, dtype))
    return [t.detach().double().cpu() for t in (out, *(x.grad for x in xs))]


def assert_matches_reference(q, k, v, do, causal: bool, got: list[torch.Tensor]) -> None:
    truth = run(naive_attention, q, k, v, do, causal, torch.float64, "cpu")
    same_dtype = run(naive_attention, q, k, v, do, causal, DTYPE)
    for name, g, t, s in zip(("O", "dQ", "dK", "dV"), got, truth, same_dtype):
        err, allowed = (g - t).abs().max().item(), 2 * (s - t).abs().max().item() + FLOOR
        assert err <= allowed, f"{name}: max error {err:.2e} > {allowed:.2e}"


@pytest.mark.parametrize("B,H,H_kv,Tq,Tk,D,causal", CASES)
def test_output_and_gradients_match_naive_fp64(B, H, H_kv, Tq, Tk, D, causal):
    q, k, v, do = make_inputs(B, H, H_kv, Tq, Tk, D)
    assert_matches_reference(q, k, v, do, causal, run(flash_attention, q, k, v, do, causal, DTYPE))


def test_large_scores_do_not_overflow():
    # scores up to about +-150: exp() of them overflows fp32 and bf16 unless the running max is
    # subtracted first, which is what the online softmax is for
    q, k, v, do = make_inputs(1, 2, 1, 40, 40, 32, scale=40.0)
    got = run(flash_attention, q, k, v, do, True, DTYPE)
    assert all(torch.isfinite(t).all() for t in got)
    assert_matches_reference(q, k, v, do, True, got)


def test_strided_inputs_match_contiguous():
    # the model's layout: q, k, v split out of one fused projection (B, T, (H + 2 H_kv) * D) and
    # seen as (B, H, T, D); k and v read from a longer KV-cache buffer; dO arrives transposed
    B, H, H_kv, T, D = 2, 4, 2, 24, 32
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, T, (H + 2 * H_kv) * D, generator=g).to(DEVICE, DTYPE)
    q, k, v = qkv.split([H * D, H_kv * D, H_kv * D], dim=-1)
    q = q.view(B, T, H, D).transpose(1, 2)
    cache = torch.zeros(2, B, H_kv, T + 9, D, device=DEVICE, dtype=DTYPE)
    cache[0, :, :, :T], cache[1, :, :, :T] = k.view(B, T, H_kv, D).transpose(1, 2), v.view(B, T, H_kv, D).transpose(1, 2)
    k, v = cache[0, :, :, :T], cache[1, :, :, :T]
    do_t = torch.randn(B, T, H, D, generator=g).to(DEVICE, DTYPE)

    def grads(q, k, v):
        xs = [t.detach().requires_grad_() for t in (q, k, v)]
        out = flash_attention(*xs, causal=True)
        (out.transpose(1, 2) * do_t).sum().backward()  # upstream gradient with non-unit head-dim stride
        return [out.detach(), *(x.grad for x in xs)]

    strided = grads(q, k, v)
    dense = grads(q.contiguous(), k.contiguous(), v.contiguous())
    assert not q.is_contiguous() and not k.is_contiguous()
    for a, b in zip(strided, dense):
        assert torch.equal(a, b)


def test_backward_is_deterministic():
    q, k, v, do = make_inputs(2, 4, 2, 70, 70, 32)
    first, second = (run(flash_attention, q, k, v, do, True, DTYPE) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_unsupported_head_dim_is_a_user_error():
    q, k, v, _ = make_inputs(1, 2, 2, 8, 8, 48)
    with pytest.raises(NanozhError, match=r"^nanozh: attention.py: head dim 48 .*attn_impl=sdpa"):
        flash_attention(q.to(DEVICE, DTYPE), k.to(DEVICE, DTYPE), v.to(DEVICE, DTYPE))


def test_cpu_tensors_without_interpreter_are_a_user_error(monkeypatch):
    monkeypatch.setattr(attention, "INTERPRET", False)
    q, k, v, _ = make_inputs(1, 2, 2, 8, 8, 32)
    with pytest.raises(NanozhError, match=r"^nanozh: attention.py: attn_impl=triton needs a CUDA GPU"):
        flash_attention(q.float(), k.float(), v.float())


def test_training_step_with_triton_matches_sdpa():
    # one forward/backward/SGD step of a small GQA model, attention through the dispatcher
    import model

    amp = DTYPE if DEVICE == "cuda" else torch.float32  # the CPU runs the model in fp32

    def step(impl: str) -> tuple[float, dict[str, torch.Tensor], float]:
        torch.manual_seed(0)
        config = model.ModelConfig(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=128, block_size=48, attn_impl=impl)
        net = model.Transformer(config).to(DEVICE)
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        idx = torch.randint(0, 96, (2, 41), generator=torch.Generator().manual_seed(3)).to(DEVICE)
        with torch.autocast(DEVICE, amp, enabled=amp != torch.float32):
            _, loss = net(idx[:, :-1], idx[:, 1:])
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
        opt.step()
        with torch.no_grad(), torch.autocast(DEVICE, amp, enabled=amp != torch.float32):
            _, loss_after = net(idx[:, :-1], idx[:, 1:])
        return loss.item(), grads, loss_after.item()

    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 1e-2}[amp]
    loss_t, grads_t, after_t = step("triton")
    loss_s, grads_s, after_s = step("sdpa")
    assert abs(loss_t - loss_s) <= tol * abs(loss_s)
    assert abs(after_t - after_s) <= tol * abs(after_s)
    assert after_s < loss_s  # the step learned something, so the comparison above is not vacuous
    for name, g in grads_s.items():
        rel = (grads_t[name] - g).norm() / g.norm()
        assert rel <= tol, f"{name}: relative gradient difference {rel:.2e}"


KERNELS = {"fwd": attention._fwd_kernel, "dkdv": attention._bwd_dkdv_kernel, "dq": attention._bwd_dq_kernel}
CONFIGS = [(kernel, config) for kernel, tuner in KERNELS.items() for config in tuner.configs]


def config_name(kernel: str, config) -> str:
    return f"{kernel}-M{config.kwargs['BLOCK_M']}-N{config.kwargs['BLOCK_N']}-w{config.num_warps}-s{config.num_stages}"


@pytest.mark.parametrize("kernel,config", CONFIGS, ids=[config_name(*kc) for kc in CONFIGS])
def test_every_autotune_config_matches_naive_fp64(kernel, config, monkeypatch):
    # Autotuning keeps the fastest config and drops any that fails to compile (too much shared
    # memory on this GPU, say), so a broken config hides behind the others until a GPU or shape
    # picks it. Alone in its list, a config is used without tuning, and a failure names it.
    monkeypatch.setattr(KERNELS[kernel], "configs", [config])
    # causal GQA with Tq < Tk, and non-causal, both ragged; tile-sized under the interpreter
    shapes = [(1, 4, 2, 70, 201, 128, True), (2, 2, 1, 130, 130, 128, False)] if DEVICE == "cuda" else \
             [(1, 2, 1, 20, 50, 32, True), (1, 2, 2, 33, 33, 32, False)]
    for B, H, H_kv, Tq, Tk, D, causal in shapes:
        q, k, v, do = make_inputs(B, H, H_kv, Tq, Tk, D, seed=Tq)
        assert_matches_reference(q, k, v, do, causal, run(flash_attention, q, k, v, do, causal, DTYPE))
