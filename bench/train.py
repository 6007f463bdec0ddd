"""Training throughput of the model presets: tokens/s, MFU and peak memory through train_pretrain.py's
own loop, per attention implementation and with or without torch.compile, next to a bare loop (the
same model and batch: forward, backward, AdamW step, nothing else: no loader, clipping, per-step
sync, progress bar or logging), so that what the trainer adds shows as its overhead.

    python -m bench.train                                           # tiny preset on the CPU
    nice python -m bench.train --threads 1 --steps 30 --repeats 3   # steadier on a shared, busy CPU
    python -m bench.train --presets 26m,100m --attn triton,sdpa --compile 0,1 --batch_size 16   # a GPU
    python -m bench.train --presets 26m --data out/data/pretrain --loops trainer --json rows.json  # real text
    python -m bench.train --presets tiny,moe-tiny --data out/data/pretrain --loops trainer --steps 300 --eval 1 --lr 3e-3
                          # dense vs mixture of experts of the same active parameters: validation loss after the same tokens

Each measurement runs in its own process (peak memory and compile caches are per variant) on
random tokens (speed does not depend on the text) and times each of --steps steps after --warmup
steps; tokens/s comes from the median step time, and with --repeats the best repeat is kept (on a
busy, shared machine the median and the best are the least disturbed numbers).
MFU = Transformer.flops_per_token x tokens/s / the GPU's dense bf16 peak (trainer.PEAK_TFLOPS);
there is no meaningful peak for a CPU, so it prints n/a there. The trainer loop's learning rate
warms up over the --warmup steps and a few losses are logged, so on real text (--data) its first
and last logged loss show whether the run learns; --eval 1 adds the validation loss after the last
step (eval_tokens of the val split, the same for every preset); --json FILE writes the rows.
"""

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent

import trainer
from data.shards import SplitWriter, write_meta
from files import read_jsonl, write_text_atomic
from model import ModelConfig, Transformer, autocast, pick_dtype
from train_pretrain import PretrainConfig, train

VOCAB = 16000  # the shipped tokenizer's


def random_shards(out_dir: Path, n_tokens: int) -> None:
    """A pretraining shard directory of uniformly random tokens, with the shipped tokenizer."""
    rng = np.random.default_rng(0)
    out_dir.mkdir(parents=True)
    splits = {}
    for split, n in (("train", n_tokens), ("val", 1 << 16)):
        writer = SplitWriter(out_dir, split, "pretrain", VOCAB)
        writer.add(rng.integers(6, VOCAB, size=n))
        splits[split] = writer.close()
    write_meta(out_dir, {"kind": "pretrain", "vocab_size": VOCAB, "splits": splits})
    shutil.copyfile(ROOT / "tokenizer" / "tokenizer.model", out_dir / "tokenizer.model")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def trainer_loop(spec: dict, model_flags: list[str]) -> tuple[list[float], list[float], float | None]:
    """Seconds per step of train_pretrain.train after the warmup steps, the logged losses and, with
    spec["eval"], the validation loss after the last step. The clock reads at each step's
    progress-bar update, so everything the loop does counts (not that final evaluation)."""
    stamps = []
    update = trainer.Logger.update
    trainer.Logger.update = lambda self, steps=1: (stamps.append(time.perf_counter()), update(self, steps))
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = trainer.parse_config(PretrainConfig, [
            *model_flags, f"--data={spec['data']}", f"--out_dir={out_dir}", f"--batch_size={spec['batch_size']}",
            f"--max_steps={spec['warmup'] + spec['steps']}", "--save_every=1000000000", f"--lr={spec['lr']}",
            f"--eval_every={spec['warmup'] + spec['steps'] if spec['eval'] else 0}",
            f"--device={spec['device']}", f"--dtype={spec['dtype']}", f"--compile={spec['compile']}",
            # full learning rate once timing starts; four logged losses (a log line syncs the device once)
            f"--warmup_steps={spec['warmup']}", f"--log_every={max(1, spec['steps'] // 4)}"])
        train(cfg)
        records = [r for _, r in read_jsonl(Path(out_dir) / "metrics.jsonl")]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    return list(np.diff(stamps[spec["warmup"] - 1:])), [r["loss"] for r in records if "loss" in r], (val or [None])[-1]


def bare_loop(spec: dict, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> list[float]:
    """Seconds per step of the bare loop after the warmup steps."""
    torch.manual_seed(0)
    model = Transformer(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_model = torch.compile(model) if spec["compile"] else model
    x, y = (torch.randint(6, VOCAB, (spec["batch_size"], config.block_size), device=device) for _ in range(2))
    ctx = autocast(device, dtype)
    stamps = []
    for i in range(spec["warmup"] + spec["steps"]):
        if i == spec["warmup"]:
            sync(device)
            t0 = time.perf_counter()
        with ctx:
            _, loss = step_model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    sync(device)
    if device.type == "cuda":  # the bare loop never waits for the GPU: only the mean step is timed
        return [(time.perf_counter() - t0) / spec["steps"]] * spec["steps"]
    return list(np.diff(stamps[spec["warmup"] - 1:]))


def child(spec: dict) -> dict:
    """One measurement, in this (fresh) process."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    model_settings = json.loads((ROOT / "configs" / f"{spec['preset']}.json").read_text())["model"]
    model_settings = {**model_settings, "attn_impl": spec["attn"], "vocab_size": VOCAB}
    if spec["block_size"]:
        model_settings["block_size"] = spec["block_size"]
    config = ModelConfig.from_dict(model_settings)
    model_flags = [f"--model.{k}={v}" for k, v in model_settings.items() if k != "vocab_size"]
    dist = trainer.init_distributed(spec["device"])
    dtype = pick_dtype(spec["dtype"], dist.device)
    step_times, losses, val_loss = (trainer_loop(spec, model_flags) if spec["loop"] == "trainer"
                                    else (bare_loop(spec, config, dist.device, dtype), [], None))
    tok_s = spec["batch_size"] * config.block_size / float(np.median(step_times))
    with torch.device("meta"):
        model = Transformer(config)
    flops_per_token = model.flops_per_token(config.block_size)
    return {"tok_s": tok_s, "val_loss": val_loss, "active": model.param_counts()["active"], "mfu": trainer.mfu(flops_per_token, tok_s, dist), "mem_gib": trainer.memory_gib(dist.device),
            "block_size": config.block_size, "dtype": str(dtype).removeprefix("torch."), "device": str(dist.device),
            "losses": losses}


def measure(spec: dict, module: str = "bench.train") -> dict:
    """Run `python -m module --child SPEC --result FILE` (a fresh process, so each measurement has its
    own peak memory and torch state) and return what it wrote, or {"error": its last line}."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result:
        cmd = [sys.executable, "-m", module, "--child", json.dumps(spec), "--result", result.name]
        run = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        if run.returncode != 0:
            sys.stderr.write(run.stderr)  # the whole traceback, for the log
            # the last line that is not a progress bar's (tqdm redraws with carriage returns)
            lines = [line for line in run.stderr.replace("\r", "\n").splitlines() if line.strip() and "step/s]" not in line]
            return {"error": lines[-1] if lines else f"exit {run.returncode}"}
        return json.loads(Path(result.name).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="tiny", help="comma-separated configs/*.json names")
    p.add_argument("--attn", default="", help="attn_impl values (default: triton,sdpa on CUDA, sdpa on CPU)")
    p.add_argument("--compile", default="0", help="0, 1 or 0,1")
    p.add_argument("--loops", default="trainer,bare")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--block_size", type=int, default=0, help="0 = the preset's")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0 = torch's default)")
    p.add_argument("--data", default="", help="a pretraining shard dir (default: random tokens in a temp dir)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--eval", type=int, default=0, help="1: the trainer loop's validation loss after its last step")
    p.add_argument("--lr", type=float, default=6e-4, help="the trainer loop's peak learning rate")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        Path(args.result).write_text(json.dumps(child(json.loads(args.child))))
        return

    cuda = torch.cuda.is_available() and args.device != "cpu"
    attns = (args.attn or ("triton,sdpa" if cuda else "sdpa")).split(",")
    variants = list(itertools.product(args.presets.split(","), attns, [int(c) for c in args.compile.split(",")]))
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if not data:
            data = str(Path(tmp) / "shards")
            random_shards(Path(data), n_tokens=1 << 21)
        base = {"data": data, "batch_size": args.batch_size, "block_size": args.block_size, "steps": args.steps,
                "warmup": args.warmup, "device": args.device, "dtype": args.dtype, "threads": args.threads,
                "eval": args.eval, "lr": args.lr}
        rows = []
        runs = [(v, loop) for v in variants for loop in args.loops.split(",")] * args.repeats
        for (preset, attn, compile_), loop in tqdm(runs, desc="bench.train", file=sys.stderr):
            spec = {**base, "preset": preset, "attn": attn, "compile": compile_, "loop": loop}
            rows.append(((preset, attn, compile_, loop), measure(spec)))

    best = {}
    for key, r in rows:  # best of the repeats
        if key not in best or r.get("tok_s", 0) > best[key].get("tok_s", 0):
            best[key] = r
    print("\n| preset | active params | attn | compile | loop | dtype | batch x block | tokens/s | MFU | peak mem | "
          "trainer overhead | val loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (preset, attn, compile_, loop), r in best.items():
        if "error" in r:
            print(f"| {preset} | | {attn} | {compile_} | {loop} | | | error: {r['error']} | | | | |")
            continue
        bare = best.get((preset, attn, compile_, "bare"), {})
        overhead = f"{100 * (1 - r['tok_s'] / bare['tok_s']):+.1f}%" if loop == "trainer" and "tok_s" in bare else ""
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        val = "" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
        print(f"| {preset} | {r['active'] / 1e6:.2f}M | {attn} | {compile_} | {loop} | {r['dtype']} | "
              f"{args.batch_size} x {r['block_size']} | {r['tok_s']:,.0f} | {mfu} | {r['mem_gib']:.2f} GiB | {overhead} | {val} |")
    device = next((r["device"] for _, r in best.items() if "device" in r), "?")
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"\n{device} ({name}), torch {torch.__version__}; median of {args.steps} steps after {args.warmup}, "
          f"best of {args.repeats}; peak mem = max CUDA allocated, or the process's max RSS on the CPU")
    print("command: python -m bench.train " + " ".join(sys.argv[1:]))
    if args.json:
        rows = [{"preset": preset, "attn": attn, "compile": compile_, "loop": loop, "batch_size": args.batch_size, **r}
                for (preset, attn, compile_, loop), r in best.items()]
        write_text_atomic(args.json, json.dumps({"gpu": name, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
