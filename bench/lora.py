"""What LoRA saves: trainable parameters, optimizer state and peak memory of one fine-tuning step,
full fine-tuning vs LoRA, for SFT and for DPO (whose LoRA reference is the policy with its adapters
off, where full DPO keeps a second, frozen copy of the model).

    python -m bench.lora                                  # 26m preset, rank 8 and 16, on the CPU
    python -m bench.lora --preset 100m --batch_size 16    # on a GPU

Each variant runs in its own process (peak memory is per process): the start model (random
weights of the preset, saved once) is loaded, wrapped by lora.setup, and trained for --steps steps
of the bare loop (forward under autocast, backward, trainer.make_optimizer's AdamW step) on random
tokens, --batch_size rows (DPO: pairs, so twice the rows) of the preset's context. Optimizer state =
the bytes of AdamW's moments after the first step. Peak memory = max CUDA memory allocated, or on
the CPU the process's max resident set (which includes ~0.3-0.5 GB of torch itself).
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

import lora
import trainer
from model import ModelConfig, Transformer, autocast, load_model, pick_device, pick_dtype
from bench.train import measure
from train_dpo import answer_logps, dpo_loss

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 16000  # the shipped tokenizer's


def child(spec: dict) -> dict:
    device = pick_device(spec["device"])
    dtype = pick_dtype(spec["dtype"], device)
    model = load_model(spec["model_dir"], device)
    settings = lora.LoraSettings(lora_rank=spec["rank"])
    model = lora.setup(model, settings, spec["model_dir"], seed=0).train()
    reference = None
    if spec["kind"] == "dpo":
        reference = (lora.base_view(model) if spec["rank"] else
                     load_model(spec["model_dir"], device).eval().requires_grad_(False))
    optimizer = trainer.make_optimizer(model, argparse.Namespace(weight_decay=0.0, lr=1e-4, beta1=0.9, beta2=0.95),
                                       device)
    rows = spec["batch_size"] * (2 if spec["kind"] == "dpo" else 1)
    T = model.config.block_size
    x = torch.randint(6, VOCAB, (rows, T), device=device)
    mask = torch.ones(rows, T, dtype=torch.bool, device=device)
    state_bytes = 0
    for step in range(spec["steps"]):
        with autocast(device, dtype):
            if reference is None:
                loss = model(x, x)[1]
            else:
                with torch.no_grad():
                    rc, rr = answer_logps(reference, x, x, mask).chunk(2)
                pc, pr = answer_logps(model, x, x, mask).chunk(2)
                loss = dpo_loss(pc, pr, rc, rr, beta=0.1)[0].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                              if torch.is_tensor(t) and t.dim() > 0)
    return {"params": model.num_params(), "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "optimizer_bytes": state_bytes, "peak_gib": trainer.memory_gib(device), "device": str(device),
            "dtype": str(dtype).removeprefix("torch.")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="26m", help="a configs/*.json name")
    p.add_argument("--ranks", default="8,16", help="LoRA ranks to compare with full fine-tuning")
    p.add_argument("--kinds", default="sft,dpo")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        Path(args.result).write_text(json.dumps(child(json.loads(args.child))))
        return
    settings = json.loads((ROOT / "configs" / f"{args.preset}.json").read_text())["model"]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        torch.manual_seed(0)
        Transformer(ModelConfig.from_dict({**settings, "vocab_size": VOCAB})).save(model_dir)
        shutil.copyfile(ROOT / "tokenizer" / "tokenizer.model", model_dir / "tokenizer.model")
        variants = [(kind, rank) for kind in args.kinds.split(",") for rank in [0] + [int(r) for r in args.ranks.split(",")]]
        rows = [(kind, rank, measure({"kind": kind, "rank": rank, "model_dir": str(model_dir), "batch_size": args.batch_size,
                                      "steps": args.steps, "device": args.device, "dtype": args.dtype}, "bench.lora"))
                for kind, rank in tqdm(variants, desc="bench.lora", file=sys.stderr)]
    print(f"\n| {args.preset} | fine-tuning | trainable parameters | optimizer state | peak memory |")
    print("|---|---|---|---|---|")
    for kind, rank, r in rows:
        what = f"{kind.upper()} {'full' if rank == 0 else f'LoRA r={rank}'}"
        if "error" in r:
            print(f"| | {what} | error: {r['error']} | | |")
            continue
        print(f"| | {what} | {r['trainable']:,} ({100 * r['trainable'] / r['params']:.2f}%) | "
              f"{r['optimizer_bytes'] / 2**20:.1f} MiB | {r['peak_gib']:.2f} GiB |")
    device = next((f"{r['device']}, {r['dtype']}" for *_, r in rows if "device" in r), "?")
    print(f"\n{device}, torch {torch.__version__}; batch {args.batch_size} (DPO: pairs) x the preset's context, "
          f"{args.steps} steps; peak = max CUDA allocated, or max RSS on the CPU")
    print("command: python -m bench.lora " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
