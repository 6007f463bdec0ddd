"""LoRA: low-rank adapters for fine-tuning (Hu et al., 2021), written by hand in plain PyTorch.

    python train_sft.py --init_from out/pretrain/latest --data out/data/sft --out_dir out/sft_lora --lora_rank 8
    python train_dpo.py --init_from out/sft/latest --data out/data/dpo --out_dir out/dpo_lora --lora_rank 8
    python lora.py --merge --model out/sft_lora/latest --out out/sft_merged   # = python export.py --merge ...

A LoRA layer keeps a linear layer's weight W (out x in) frozen and learns a low-rank change of it:

    y = x W^T + (alpha / r) * dropout(x) A^T B^T        A: (r, in), B: (out, r)

A starts random (Kaiming-uniform, as the paper's code), B at zero, so training starts exactly at
the base model; alpha / r keeps the size of an update about the same whichever rank is picked.
Only A and B train: the base weights are frozen and not in the optimizer, so AdamW keeps its two
moments for the adapters only (bench/lora.py measures what that saves). DPO needs no second model
for its reference: it is the same network with the adapters switched off (base_view).

An adapter directory is a model directory that sample.py, eval.py, --init_from and --resume load
like any other (model.load_model sends it here): adapter.safetensors (the A and B matrices only),
adapter_config.json (rank, alpha, dropout, targets, the base model directory and the sha256 of its
model.safetensors), config.json and tokenizer.model. Loading it loads the base, checks the sha256 (a
base that changed since is another model: a one-line error) and puts the adapters on. merge() folds
them into the weights, W + (alpha / r) B A, for a plain model directory that runs at the base's speed.
"""

import argparse
import dataclasses
import json
import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from errors import NanozhError, exit_on_user_error, user_error
from files import atomic_path, file_sha256, write_text_atomic
from model import ModelConfig, Transformer, linear, load_model

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter.safetensors"


@dataclass
class LoraSettings:
    """The LoRA flags of train_sft.py and train_dpo.py: both configs inherit them."""
    lora_rank: int = 0            # rank r of the adapters; 0 = full fine-tuning
    lora_alpha: float = 16.0      # the update is scaled by alpha / r
    lora_dropout: float = 0.0     # dropout on the adapters' input (the base path has none)
    lora_targets: str = "qkv,proj,gate_up,down"  # names of the linear layers to adapt: attention, MLP


@dataclass
class Adapter:
    """What a LoRA model's adapters are (Transformer.adapter): their settings and their base."""
    rank: int
    alpha: float
    dropout: float
    targets: list[str]
    base: str                     # the base model directory, as given to --init_from
    base_sha256: str              # of base/model.safetensors when the adapters were made

    def save(self, model: Transformer, out_dir: Path) -> None:
        """Transformer.save of a LoRA model: the A and B matrices and this config, each atomically."""
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if is_lora_key(k)}
        with atomic_path(out_dir / ADAPTER_WEIGHTS) as tmp:
            save_file(state, tmp, metadata={"format": "pt"})
        write_text_atomic(out_dir / ADAPTER_CONFIG, json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n")


def is_lora_key(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


class LoRALinear(nn.Module):
    """A bias-free nn.Linear plus a trainable low-rank update; `enabled = False` is the base layer alone."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, generator: torch.Generator):
        super().__init__()
        # the frozen matrix keeps its name, so the model's state_dict keeps the base's keys
        self.weight = base.weight
        a = torch.empty(rank, base.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # nn.Linear's own init
        self.lora_A = nn.Parameter(a.to(base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)  # linear, not F.linear: compiled for generation, one row is a loop of its own
        if not self.enabled:
            return y
        return y + linear(linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling


def add_adapters(model: Transformer, adapter: Adapter, seed: int = 0) -> Transformer:
    """Freeze every weight of `model` and replace each linear layer named in adapter.targets by a
    LoRALinear around it (in place). A is drawn from `seed`, so every rank draws the same."""
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    found = set()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in adapter.targets and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, adapter.rank, adapter.alpha, adapter.dropout, generator))
                found.add(name)
    if set(adapter.targets) - found:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise user_error("--lora_targets", f"{', '.join(sorted(set(adapter.targets) - found))} is no linear layer "
                         f"of the model", f"use some of: {','.join(linears)}")
    model.adapter = adapter
    return model


def setup(model: Transformer, cfg: LoraSettings, base_dir: str, seed: int) -> Transformer:
    """The model a training run fine-tunes: `model` itself when cfg.lora_rank is 0, else `model`
    (loaded from base_dir) frozen, with adapters on cfg.lora_targets."""
    if cfg.lora_rank == 0:
        return model
    problems = [(cfg.lora_rank < 0, f"--lora_rank={cfg.lora_rank} is negative", "0 turns LoRA off; 8 or 16 are usual"),
                (cfg.lora_alpha <= 0, f"--lora_alpha={cfg.lora_alpha} must be positive", "16 is usual"),
                (not 0 <= cfg.lora_dropout < 1, f"--lora_dropout={cfg.lora_dropout} is outside [0, 1)", "")]
    for bad, what, fix in problems:
        if bad:
            raise user_error("command line", what, fix)
    if is_adapter_dir(base_dir):
        raise user_error(base_dir, "is a LoRA adapter directory; new adapters need a plain model directory as base",
                         f"merge it first: python lora.py --merge --model {base_dir} --out DIR")
    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    adapter = Adapter(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets, str(base_dir),
                      file_sha256(Path(base_dir) / "model.safetensors"))
    return add_adapters(model, adapter, seed)


def is_adapter_dir(model_dir: str | os.PathLike) -> bool:
    return (Path(model_dir) / ADAPTER_CONFIG).is_file()


def load(model_dir: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Transformer:
    """The model of an adapter directory: its base (checked by sha256) with the adapters on."""
    model_dir = Path(model_dir)
    config_path = model_dir / ADAPTER_CONFIG
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
        adapter = Adapter(**raw)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise user_error(config_path, f"not a valid adapter config ({e})", "restore it from the checkpoint") from None
    base = Path(adapter.base)
    if not (base / "model.safetensors").is_file():
        raise user_error(config_path, f"its base model directory {base} is gone",
                         "run from where training ran, or point \"base\" at the base model directory")
    if is_adapter_dir(base):
        raise user_error(config_path, f"its base {base} is itself an adapter directory", "merge that one first")
    sha = file_sha256(base / "model.safetensors")
    if sha != adapter.base_sha256:
        raise user_error(config_path, f"the base model in {base} is not the one these adapters were trained on "
                         f"(sha256 {sha[:12]}… != {adapter.base_sha256[:12]}…)",
                         "point \"base\" at the model directory the adapters were trained from")
    base_model = load_model(base)
    # the adapter's own config.json may set another attn_impl or dropout; nothing else may differ
    config = base_model.config
    if (model_dir / "config.json").is_file():
        try:
            config = ModelConfig.from_dict(json.loads((model_dir / "config.json").read_text()), str(model_dir / "config.json"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise user_error(model_dir / "config.json", f"not valid JSON ({e})") from None
        if dataclasses.replace(config, attn_impl=base_model.config.attn_impl, dropout=base_model.config.dropout) != base_model.config:
            raise user_error(model_dir / "config.json", f"describes another model than its base {base}",
                             "restore it from the checkpoint")
    model = Transformer(config)
    model.load_state_dict(base_model.state_dict())
    add_adapters(model, adapter)
    weights_path = model_dir / ADAPTER_WEIGHTS
    try:
        state = load_file(weights_path, device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for broken files
        raise user_error(weights_path, f"missing, truncated or corrupted ({str(e).splitlines()[0]})",
                         "restore it from another checkpoint") from None
    expected = {k: v for k, v in model.state_dict().items() if is_lora_key(k)}
    if state.keys() != expected.keys() or any(state[k].shape != expected[k].shape for k in state):
        raise user_error(weights_path, "the adapter weights do not match adapter_config.json", "restore both from one checkpoint")
    model.load_state_dict(state, strict=False)  # the base weights are already in
    return model.to(device=device, dtype=dtype)


@contextmanager
def adapters_off(model: Transformer):
    """Within the block, `model` computes its base: every adapter switched off, in eval mode."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    was_training = model.training
    for m in layers:
        m.enabled = False
    model.eval()
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True
        model.train(was_training)


class base_view:
    """The base model under a LoRA model, without a copy of its weights: calling it runs `model`
    with the adapters off, in eval mode and without gradients (DPO's frozen reference)."""

    def __init__(self, model: Transformer):
        self.model, self.config = model, model.config

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        with adapters_off(self.model):
            return self.model(*args, **kwargs)


@torch.no_grad()
def merge(model: Transformer) -> Transformer:
    """A plain Transformer whose weights are W + (alpha / r) B A for every adapted layer (computed
    in fp32), the other weights as they are; a model without adapters is returned unchanged."""
    if model.adapter is None:
        return model
    state = {k: v for k, v in model.state_dict().items() if not is_lora_key(k)}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            state[f"{name}.weight"] = (m.weight.float() + m.scaling * (m.lora_B.float() @ m.lora_A.float())).to(m.weight.dtype)
    merged = Transformer(model.config).to(device=model.lm_head.weight.device, dtype=model.lm_head.weight.dtype)
    merged.load_state_dict(state)
    return merged.train(model.training)


def merge_dir(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Transformer:
    """Write the merged model of an adapter directory to out_dir, a plain model directory; returns it."""
    if not is_adapter_dir(adapter_dir):
        raise user_error(adapter_dir, f"no {ADAPTER_CONFIG} here: not an adapter directory", "pass OUT_DIR/latest of a LoRA run")
    out_dir = Path(out_dir)
    merged = merge(load(adapter_dir))
    merged.save(out_dir)
    shutil.copyfile(Path(adapter_dir) / "tokenizer.model", out_dir / "tokenizer.model")
    return merged


def main() -> None:
    p = argparse.ArgumentParser(description="Merge a LoRA adapter directory into a plain model directory.")
    p.add_argument("--merge", action="store_true", required=True, help="merge the adapters into the weights")
    p.add_argument("--model", required=True, help="an adapter directory (OUT_DIR/latest of a --lora_rank run)")
    p.add_argument("--out", required=True, help="the model directory to write")
    args = p.parse_args()
    try:
        merge_dir(args.model, args.out)
    except NanozhError as e:
        exit_on_user_error(e)
    print(f"merged {args.model} into {args.out}")


if __name__ == "__main__":
    main()
