"""Generation speed of the model presets: prefill tokens/s and decode tokens/s with and without the
KV cache (randomly initialised weights: speed does not depend on what was learned).

    python -m bench.sample                                   # tiny and 26m on the CPU
    python -m bench.sample --presets tiny --n_embd 256 --vocab_size 8192 --transformers --compile --repeat 5
    python -m bench.sample --presets tiny,26m,100m --device cuda --dtype bfloat16 --batch 1,8
    nice python -m bench.sample --threads 1                  # steadier on a shared, busy CPU

Decode is greedy, from a --prompt_len prompt to --new_tokens new tokens, for each --batch size (8
sequences decoded together: 8 concurrent streams; tokens/s counts all of them). Without the cache
every step re-runs the whole sequence, so its cost grows with the square of the length; with it
each step runs one token against the cached keys and values. Weights are fp32 and --dtype is the
autocast dtype, as in sample.py, laid out as model.load lays them out (inference_layout). --json
FILE also writes the rows.

--transformers also times transformers' LlamaForCausalLM.generate (do_sample=False, use_cache=True)
on the same weights (export.hf_state_dict) at batch 1, alternating with ours --repeat times (best of
each, so a busy shared CPU slows both alike), and checks that both pick the same greedy tokens.
--compile also times a copy of the model compiled as sample.py --compile compiles it
(model.compile_for_generation; its compile time is printed apart).
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent

from files import write_text_atomic
from model import KVCache, ModelConfig, Transformer, autocast, compile_for_generation, inference_layout


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def prefill_seconds(model: Transformer, prompt: torch.Tensor) -> float:
    return timed(lambda: model(prompt, cache=KVCache(model.config, prompt.shape[0], model.config.block_size)), prompt.device)


def decode_tokens_per_s(model: Transformer, prompt: torch.Tensor, new_tokens: int, use_cache: bool) -> float:
    seconds = timed(lambda: model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache), prompt.device)
    return new_tokens / seconds


def versus_transformers(models: dict[str, Transformer], prompt: torch.Tensor, new_tokens: int,
                        repeat: int) -> tuple[dict[str, float], float, bool]:
    """Batch-1 greedy decode tokens/s of each of ours ({"eager": model, maybe "compiled": ...}) and
    of transformers' Llama with the same weights, timed alternately (best of `repeat` each), and
    whether all of them generated the same tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM  # a test-only dependency (requirements-dev.txt)
    from transformers.utils import logging

    from export import hf_config, hf_state_dict
    from tokenizer.tokenizer import Tokenizer

    logging.set_verbosity_error()
    model = models["eager"]
    tok = Tokenizer(ROOT / "tokenizer" / "tokenizer.model")  # only its special ids go into the config
    hf = LlamaForCausalLM(LlamaConfig(**hf_config(model.config, tok, "float32"))).to(prompt.device).eval()
    hf.load_state_dict(hf_state_dict(model), strict=False)  # strict=False: a tied head is stored once
    hf.generation_config.eos_token_id = None  # random weights: run all new_tokens, as ours does
    hf.generation_config.pad_token_id = tok.pad_id
    run = {name: (lambda m=m: m.generate(prompt, new_tokens, temperature=0)) for name, m in models.items()}
    run["hf"] = lambda: hf.generate(prompt, max_new_tokens=new_tokens, do_sample=False, use_cache=True)
    best = {name: float("inf") for name in run}
    with torch.no_grad():
        outs = {name: fn() for name, fn in run.items()}  # warm-up, and the tokens (greedy: the same every run)
        for _ in range(repeat):
            for name, fn in run.items():
                best[name] = min(best[name], timed(fn, prompt.device))
    same = all(torch.equal(out, outs["hf"]) for out in outs.values())
    return {name: new_tokens / best[name] for name in models}, new_tokens / best["hf"], same


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,26m", help="comma-separated names from configs/")
    p.add_argument("--vocab_size", type=int, default=16000)
    p.add_argument("--n_embd", type=int, default=0, help="width instead of the preset's (0: the preset's)")
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--prefill_len", type=int, default=256, help="prompt length for the prefill measurement")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--batch", default="1", help="decode batch sizes (concurrent streams), comma-separated")
    p.add_argument("--transformers", action="store_true", help="also time transformers' generate at batch 1")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per side with --transformers (best of)")
    p.add_argument("--compile", action="store_true", help="also time the model compiled for generation "
                   "(model.compile_for_generation, as sample.py --compile); compiling is timed apart")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)

    rows = []
    for name in tqdm(args.presets.split(","), desc="presets"):
        settings = json.loads((ROOT / "configs" / f"{name}.json").read_text())["model"]
        # the context grows to fit the run if needed: block_size changes no weight, only the RoPE table
        block_size = max(settings["block_size"], args.prompt_len + args.new_tokens, args.prefill_len)
        config = ModelConfig.from_dict({**settings, "vocab_size": args.vocab_size, "block_size": block_size,
                                        "n_embd": args.n_embd or settings["n_embd"]}, where=f"configs/{name}.json")
        model = inference_layout(Transformer(config).to(device).eval())
        models, compile_s = {"eager": model}, None
        long_prompt = torch.randint(0, config.vocab_size, (1, args.prefill_len), device=device)
        with autocast(device, dtype):
            if args.compile:  # the same weights (a copy: compile works in place), compiled
                compile_s = timed(lambda: models.update(compiled=compile_for_generation(copy.deepcopy(model))), device)
            prefill = None
            for batch in [int(b) for b in args.batch.split(",")]:
                prompt = torch.randint(0, config.vocab_size, (batch, args.prompt_len), device=device)
                for m in models.values():  # warm-up: allocator, kernels, threads (and a batch size > 1 compiles)
                    decode_tokens_per_s(m, prompt, 8, use_cache=True)
                prefill = prefill or args.prefill_len / min(prefill_seconds(model, long_prompt) for _ in range(3))
                uncached = batch * decode_tokens_per_s(model, prompt, args.new_tokens, use_cache=False)
                hf = (None, None)
                if args.transformers and batch == 1:  # ours timed there, alternating with transformers
                    cached, hf_tok_s, same = versus_transformers(models, prompt, args.new_tokens, args.repeat)
                    hf = (hf_tok_s, same)
                else:
                    cached = {k: batch * decode_tokens_per_s(m, prompt, args.new_tokens, use_cache=True)
                              for k, m in models.items()}
                rows.append((name, model.num_params() / 1e6, batch, prefill, cached["eager"], uncached,
                             cached.get("compiled"), compile_s, *hf))

    command = "python -m bench.sample " + " ".join(sys.argv[1:])
    print(f"\n{command}\n{args.device} {args.dtype}, {torch.get_num_threads()} threads, greedy, "
          f"decode {args.prompt_len} -> {args.prompt_len + args.new_tokens} tokens, prefill {args.prefill_len} tokens")
    print("| preset | params | batch | prefill tok/s | decode tok/s, KV cache | decode tok/s, no cache | cache speed-up |"
          " compiled decode tok/s (compile s) | transformers generate tok/s | vs transformers (compiled) | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, params, batch, prefill, cached, uncached, compiled, compile_s, hf, same in rows:
        comp = f"{compiled:,.1f} ({compile_s:.0f} s)" if compiled else ""
        versus = f"{cached / hf:.2f}x" + (f" ({compiled / hf:.2f}x)" if compiled else "") if hf else ""
        hf_cols = f"{hf:,.1f} | {versus} | {'yes' if same else 'NO'}" if hf else " | | "
        print(f"| {name} | {params:.1f}M | {batch} | {prefill:,.0f} | {cached:,.1f} | {uncached:,.1f} | "
              f"{cached / uncached:.1f}x | {comp} | {hf_cols} |")
    if args.json:
        keys = ("preset", "params_m", "batch", "prefill_tok_s", "decode_tok_s", "decode_no_cache_tok_s",
                "compiled_decode_tok_s", "compile_s", "transformers_tok_s", "same_tokens_as_transformers")
        write_text_atomic(args.json, json.dumps({"device": args.device, "dtype": args.dtype, "command": command,
                                                 "rows": [dict(zip(keys, r)) for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
