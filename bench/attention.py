"""Throughput of the fused Triton attention kernel against PyTorch SDPA and the naive path (GPU only).

    python -m bench.attention                                  # causal bf16, B*H = 8*16, D 64 and 128, T 512..8192
    python -m bench.attention --dims 128 --seqlens 2048,4096 --batch 4 --heads 32 --impls triton,sdpa
    TRITON_INTERPRET=1 python -m bench.attention --device cpu --dtype fp32 --dims 32 --seqlens 64 --batch 1 --heads 2

The last line checks the script, not the speed: the kernel under the Triton interpreter, timed by the
CPU clock, no peak memory. --json FILE also writes the rows as JSON (bench/gpu_check.py reads them).

Reports TFLOP/s of the forward, the backward and both, and the peak memory of forward + backward
above the inputs, then the ratio triton / sdpa. "sdpa" is F.scaled_dot_product_attention under
each of its backends (flash, cuDNN, memory-efficient) in turn, keeping the fastest forward +
backward (its name is printed). "naive" is skipped ("oom") where its (T, T) matrices do not fit.

FLOP convention (the one FlashAttention's papers use, the same for every implementation, so the
numbers compare directly): the forward is two matmuls (S = QK^T and O = PV) of 2*T*T*D FLOPs per
head, 4*B*H*T*T*D in all, halved when causal; the backward counts five such matmuls (S recomputed,
dV, dP, dQ, dK), 2.5x the forward. Work an implementation does beyond that (our dQ kernel recomputes
S and dP to avoid atomics) is not credited.
"""

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench


from attention import flash_attention, naive_attention
from files import write_text_atomic


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",")]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=ints, default=[64, 128], help="head dims, comma-separated")
    p.add_argument("--seqlens", type=ints, default=[512, 1024, 2048, 4096, 8192], help="sequence lengths")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--non_causal", action="store_true", help="full attention instead of causal")
    p.add_argument("--impls", default="triton,sdpa,naive", help="any of triton, sdpa, naive")
    p.add_argument("--rep", type=int, default=100, help="milliseconds of timed runs per measurement")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if not set(args.impls.split(",")) <= {"triton", "sdpa", "naive"}:
        p.error(f"--impls {args.impls}: use a comma-separated subset of triton,sdpa,naive")
    return args


def cpu_bench(f, rep: int) -> float:
    """Median milliseconds of f by the CPU clock, one warm-up run then about rep ms of runs (at least 3)."""
    f()
    times = []
    while len(times) < 3 or sum(times) < rep:
        t0 = time.perf_counter()
        f()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def measure(fn, q, k, v, do, rep: int) -> tuple[float, float, float, float]:
    """Median milliseconds of forward, backward, forward + backward, and peak MiB above the inputs
    (NaN on the CPU)."""
    if q.is_cuda:
        bench = lambda f: do_bench(f, warmup=25, rep=rep, grad_to_none=[q, k, v], return_mode="median")
    else:
        bench = lambda f: cpu_bench(f, rep)
    fwd = bench(lambda: fn(q, k, v))
    out = fn(q, k, v)
    bwd = bench(lambda: out.backward(do, retain_graph=True))
    out = None  # frees its graph before the next measurement
    both = bench(lambda: fn(q, k, v).backward(do))
    for t in (q, k, v):
        t.grad = None
    if not q.is_cuda:
        return fwd, bwd, both, float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(q, k, v).backward(do)
    torch.cuda.synchronize()
    return fwd, bwd, both, (torch.cuda.max_memory_allocated() - base) / 2**20


def fastest(fns: dict, q, k, v, do, rep: int):
    """(name, measurements) of the candidate with the fastest forward + backward; measurements are
    None when every candidate ran out of memory; None when none supports the shape."""
    best = None
    for name, fn in fns.items():
        try:
            ms = measure(fn, q, k, v, do, rep)
        except torch.cuda.OutOfMemoryError:
            ms = None
        except RuntimeError:  # an SDPA backend that does not support this shape or GPU
            continue
        finally:
            torch.cuda.empty_cache()
        if best is None or best[1] is None or ms is not None and ms[2] < best[1][2]:
            best = (name, ms)
    return best


def sdpa_backends(causal: bool):
    """One callable per SDPA backend, each pinned to it."""
    def pinned(backend):
        def fn(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return fn
    names = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}
    return {name: pinned(b) for name, b in names.items()}


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.attention measures GPU kernels and found no CUDA device; nothing to do (--device cpu checks the script)")
        return
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    causal = not args.non_causal
    impls = args.impls.split(",")
    B, H = args.batch, args.heads
    print(f"$ python {' '.join(sys.argv)}")
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (Triton interpreter)"
    print(f"{gpu}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{args.dtype}, {'causal' if causal else 'non-causal'}, B={B} H={H}")
    header = f"{'D':>4} {'T':>6}  {'impl':<16} {'fwd TF/s':>9} {'bwd TF/s':>9} {'f+b TF/s':>9} {'peak MiB':>9}"
    print(header + "\n" + "-" * len(header))
    ratios, rows = [], []
    for D in args.dims:
        for T in args.seqlens:
            fwd_flops = 4 * B * H * T * T * D / (2 if causal else 1)
            flops = (fwd_flops, 2.5 * fwd_flops, 3.5 * fwd_flops)
            g = torch.Generator(device=args.device).manual_seed(0)
            q, k, v, do = (torch.randn(B, H, T, D, device=args.device, dtype=dtype, generator=g) for _ in range(4))
            for t in (q, k, v):
                t.requires_grad_()
            candidates = {"triton": {"triton": lambda q, k, v: flash_attention(q, k, v, causal)},
                          "sdpa": {f"sdpa({n})": f for n, f in sdpa_backends(causal).items()},
                          "naive": {"naive": lambda q, k, v: naive_attention(q, k, v, causal)}}
            results = {}
            for impl in impls:
                best = fastest(candidates[impl], q, k, v, do, args.rep)
                if best is None:
                    continue
                name, ms = results[impl] = best
                if ms is None:
                    print(f"{D:>4} {T:>6}  {name:<16} {'out of memory: skipped':>39}")
                    rows.append({"D": D, "T": T, "impl": impl, "name": name, "error": "out of memory"})
                    continue
                tf = [f / (t * 1e-3) / 1e12 for f, t in zip(flops, ms[:3])]
                rows.append({"D": D, "T": T, "impl": impl, "name": name, "fwd_tflops": tf[0], "bwd_tflops": tf[1],
                             "fwd_bwd_tflops": tf[2], "peak_mib": None if ms[3] != ms[3] else ms[3]})
                print(f"{D:>4} {T:>6}  {name:<16} {tf[0]:>9.1f} {tf[1]:>9.1f} {tf[2]:>9.1f} {ms[3]:>9.0f}")
            triton_ms, sdpa_ms = results.get("triton", (0, None))[1], results.get("sdpa", (0, None))[1]
            if triton_ms and sdpa_ms:
                ratios.append((D, T, [s / t for t, s in zip(triton_ms[:3], sdpa_ms[:3])]))
                triton_row = next(r for r in rows if (r["D"], r["T"], r["impl"]) == (D, T, "triton"))
                triton_row["speedup_vs_sdpa"] = dict(zip(("fwd", "bwd", "fwd_bwd"), ratios[-1][2]))
    if ratios:
        print("\ntriton / sdpa speed, the fastest SDPA backend per row (>1: triton faster)")
        for D, T, (f, b, fb) in ratios:
            print(f"{D:>4} {T:>6}  fwd {f:.2f}x  bwd {b:.2f}x  fwd+bwd {fb:.2f}x")
    if args.json:
        write_text_atomic(args.json, json.dumps({"device": gpu, "dtype": args.dtype, "causal": causal, "B": B, "H": H,
                                                 "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
