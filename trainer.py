"""What every training script shares, and only that. Each train_*.py keeps its own loop in view
and calls these plain functions around it:

    run(PretrainConfig, train, sys.argv[1:])         # main(): train(parse_config(...)), user errors, then
                                                      # leave the process group once train() has returned
    cfg = parse_config(PretrainConfig, argv)          # dataclass defaults <- --config FILE <- --key=value
    in train(cfg):
    dist, tokenizer_path, model = setup(cfg, "pretrain")  # torchrun env, data's tokenizer, out_dir, model
    run = start_run(cfg, model, dist, tokenizer_path)     # dtype + autocast, AdamW, GradScaler, --resume,
                                                          # compile/DDP, logger, SIGINT/SIGTERM flag
    evaluate(run, 0, evaluate_fn)                     # step 0 of the curves (a fresh run)
    while step < cfg.max_steps:
        lr = set_lr(run.optimizer, lr_at(step, cfg))  # linear warmup, cosine decay to min_lr
        for each micro-step:                          # the script's own forward and backward
            with grad_sync(run, last), run.ctx: ...
        stats = step_tail(run, step, loss=...)        # unscale, clip, all-reduce, NaN check, optimizer step
        step += 1
        if after_step(run, step, stats, lr, positions, evaluate_fn):  # log / eval / save cadence
            break                                     # a rank was asked to stop: saved, exit 0
    end_run(run, step, "pretrained", detail)          # the summary line

A checkpoint is a model directory (model.safetensors + config.json, what sample.py and eval.py
load) plus tokenizer.model, train_config.json and train_state.pt (optimizer, GradScaler, step, RNG
states of every rank). It is written into OUT_DIR/.tmp_step_NNNNNNN, fsync'd, renamed into place
and only then pointed to by the `latest` symlink, so a run killed at any moment (even kill -9
during a save) leaves the previous checkpoints whole, and --resume never sees a half-written one.
Rank 0 writes checkpoints and every rank reads them on resume, so on several nodes OUT_DIR must be
on storage they all see.
"""

import ctypes
import dataclasses
import difflib
import json
import math
import os
import resource
import shutil
import signal
import sys
import time
import types
import typing
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as torch_dist
# imported before any process group exists, on purpose: its functions take group=group.WORLD as a
# default argument, evaluated at import. Imported after init_process_group (DDP imports it, through
# torch._dynamo), they would hold the world group past destroy_process_group, and its gloo threads
# would run on until the process exits, where a rank was seen to abort ("terminate called without
# an active exception") once its run had finished. Imported now, they hold None.
import torch.distributed.nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import lora
from data.shards import read_meta
from errors import NanozhError, exit_on_user_error, user_error
from files import file_sha256, read_jsonl, write_text_atomic
from model import ModelConfig, Transformer, autocast, load_model, pick_device, pick_dtype
from tokenizer.tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# config: one dataclass of defaults per script, then a JSON file, then --key=value flags


@dataclass
class TrainConfig:
    """The settings every training script has; each script subclasses it with its own defaults."""
    data: str = ""                # shard directory written by data/prepare.py (holds tokenizer.model)
    out_dir: str = "out/run"      # checkpoints, metrics.jsonl
    init_from: str = ""           # start from this model directory instead of random weights
    resume: bool = False          # continue from the newest good checkpoint in out_dir
    model: dict = field(default_factory=dict)  # ModelConfig settings: --model.n_layer=4
    # batch: tokens per step = batch_size * grad_accum * world size * sequence length
    batch_size: int = 16          # sequences per micro-step on each rank
    grad_accum: int = 1           # micro-steps per optimizer step
    max_steps: int = 1000
    # AdamW with linear warmup then cosine decay to min_lr at max_steps
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0        # max global grad norm; 0 = no clipping
    # system
    seed: int = 1337
    device: str = "auto"          # auto (cuda, else mps, else cpu), cpu, cuda, cuda:N, mps
    dtype: str = "auto"           # compute dtype under autocast: auto (bfloat16 on cuda, else float32),
                                  # bfloat16, float16 (with a GradScaler), float32; weights stay fp32
    compile: bool = False         # torch.compile the model
    # logging and checkpoints
    log_every: int = 10
    eval_every: int = 250         # validation loss every N steps (and at the end); 0 = never
    save_every: int = 500         # checkpoint every N steps (and at the end and on SIGINT/SIGTERM)
    keep_last: int = 3            # checkpoints kept; 0 = all


_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_config(cls: type, argv: list[str]):
    """Defaults of the dataclass `cls`, overridden by each `--config FILE` (JSON) in order, then
    by the other flags in order. Flags are `--key=value`, `--key value`, or `--key` for a bool;
    model settings are `--model.key=value`. Unknown keys and unparsable values are errors."""
    flags = _split_flags(argv)
    cfg = cls()
    for key, value in flags:
        if key == "config":
            _apply_config_file(cfg, value)
    for key, value in flags:
        if key != "config":
            _set(cfg, key, value, "command line", f"--{key}")
    return cfg


def _split_flags(argv: list[str]) -> list[tuple[str, str | None]]:
    flags, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise user_error("command line", f"unexpected argument {arg!r}", "flags are --key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:  # --key value, or a bare --flag when nothing follows but another flag
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            value = argv[i + 1] if has_value else None
            i += has_value
        flags.append((key.replace("-", "_"), value))
        i += 1
    return flags


def _apply_config_file(cfg, path: str | None) -> None:
    if path is None:
        raise user_error("command line", "--config needs a file", "--config configs/tiny.json")
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise user_error(path, f"cannot read config file: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise user_error(path, f"not valid JSON: {e.msg}", line=e.lineno) from None
    if not isinstance(values, dict):
        raise user_error(path, "a config file must hold one JSON object")
    for key, value in values.items():
        if key == "model":
            if not isinstance(value, dict):
                raise user_error(path, '"model" must be an object of model settings', '{"model": {"n_layer": 4}}')
            for sub, v in value.items():
                _set(cfg, f"model.{sub}", v, path, f"model.{sub}")
        else:
            _set(cfg, key, value, path, key)


def _set(cfg, key: str, value, where: str, shown: str) -> None:
    """Set one setting (a string from the command line, a JSON value from a file) to its field's type."""
    if key.startswith("model."):
        types_ = typing.get_type_hints(ModelConfig)
        name = key[len("model."):]
        if name not in types_:
            raise _unknown(where, shown, name, list(types_))
        cfg.model[name] = _convert(value, types_[name], where, shown)
        return
    types_ = typing.get_type_hints(type(cfg))
    del types_["model"]
    if key not in types_:
        raise _unknown(where, shown, key, list(types_) + ["config"])
    setattr(cfg, key, _convert(value, types_[key], where, shown))


def _unknown(where: str, shown: str, key: str, known: list[str]) -> NanozhError:
    close = difflib.get_close_matches(key, known, n=1)
    prefix = shown[: len(shown) - len(key)]  # "--", "--model.", "model." or "": as the user wrote it
    hint = f"did you mean {prefix}{close[0]}?" if close else f"known keys: {', '.join(prefix + k for k in known)}"
    return user_error(where, f"unknown config key {shown!r}", hint)


def _convert(value, typ, where: str, shown: str):
    """`value` as type `typ` (bool, int, float, str, or X | None). Command-line strings are parsed;
    JSON values must already have the type (an int is accepted for a float)."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType) and type(None) in typing.get_args(typ):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    if value is None and typ is not bool:
        raise user_error(where, f"{shown} needs a value", f"{shown}=VALUE")
    ok = None
    if typ is bool:
        ok = value if isinstance(value, bool) else True if value is None else _BOOLS.get(str(value).lower())
    elif typ in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        ok = typ(value) if typ is float or isinstance(value, int) else None
    elif typ in (int, float) and isinstance(value, str):
        try:
            ok = typ(value)
        except ValueError:
            pass
    elif typ is str and isinstance(value, str):
        ok = value
    if ok is None:
        raise user_error(where, f"{shown}={value!r} is not a valid {typ.__name__}")
    return ok


def print_config(cfg, model_config: ModelConfig) -> None:
    resolved = {**asdict(cfg), "model": asdict(model_config)}
    print(json.dumps(resolved, indent=2, ensure_ascii=False))

# -----------------------------------------------------------------------------
# distributed setup, device and precision


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> Dist:
    """Rank and device from the environment torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE; the same
    on one node or many); a plain `python train_x.py` is rank 0 of 1. NCCL on CUDA, gloo on CPU.
    --device=auto picks as sample.py and eval.py do (model.pick_device: cuda, mps, cpu)."""
    dev = pick_device(device)
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if "TORCHELASTIC_RUN_ID" in os.environ:
        _stop_when_torchrun_dies()
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world_size > 1 and dev.type == "mps":
        raise user_error("command line", "torchrun with several ranks on mps is not supported", "run one process")
    if world_size > 1:
        torch_dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                      device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, local_rank, world_size, dev)


def _stop_when_torchrun_dies() -> None:
    """If torchrun itself is killed (kill -9), its workers are not: they would run on as orphans and
    keep writing checkpoints into OUT_DIR beside the next run (seen in testing). Ask Linux to send
    this worker SIGTERM when its parent dies; the stop flag turns that into save-and-exit."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # torchrun died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


def cleanup_distributed(wait: bool = False) -> None:
    """Leave the process group. At the normal end of a run (wait=True) every rank first waits for
    the others: a rank that tore gloo down while rank 0 was still writing the last checkpoint was
    seen to abort at exit ("terminate called without an active exception"), failing the torchrun.
    Call it once the DDP model is gone, so that leaving drops the group's last reference: whoever
    drops it joins gloo's threads, and a DDP reducer does so holding Python's GIL, which a gloo
    thread freeing a finished collective's tensors can be waiting for (a rank was seen hung there
    for good); the group itself lets go of the GIL while it joins."""
    if torch_dist.is_initialized():
        if wait:
            torch_dist.barrier()
        torch_dist.destroy_process_group()


def run(config_cls: type, train: typing.Callable, argv: list[str]) -> None:
    """Each train_*.py's main(): train(parse_config(config_cls, argv)); a user error becomes its
    one-line message and exit status 1; the process group is left however the run ends."""
    finished = False
    try:
        train(parse_config(config_cls, argv))
        finished = True
    except NanozhError as e:
        exit_on_user_error(e)
    finally:
        # here, not at the end of train(): its DDP model has been freed on return (cleanup_distributed)
        cleanup_distributed(wait=finished)


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none. A
    disabled scaler passes everything through, so the loop uses one code path for all dtypes."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

# -----------------------------------------------------------------------------
# model, optimizer, learning rate


def setup(cfg, kind: str) -> tuple[Dist, Path, Transformer]:
    """The start of every train(cfg): distributed init, the data's tokenizer (checked against
    --init_from's), a refusal to mix a fresh run into an old out_dir, and the model on the device."""
    dist = init_distributed(cfg.device)
    tokenizer_path = data_tokenizer(cfg, kind)
    check_out_dir(cfg.out_dir, cfg.resume)
    return dist, tokenizer_path, build_model(cfg, tokenizer_path, dist.device)


def build_model(cfg, tokenizer_path: Path, device: torch.device) -> Transformer:
    """A fresh model from cfg.model with the tokenizer's vocabulary, or the model in cfg.init_from
    (data_tokenizer has checked that its tokenizer is the data's; of cfg.model only attn_impl and
    dropout may differ from its config). Every rank builds the same weights: the seed is shared."""
    if cfg.init_from:
        loaded = lora.merge(load_model(cfg.init_from))  # an adapter directory: its adapters folded in
        asked = dataclasses.replace(loaded.config, **cfg.model)
        check_same_model(Path(cfg.init_from) / "config.json", loaded.config, asked, ignore=("attn_impl", "dropout"),
                         fix="leave out model settings other than attn_impl and dropout: they come from --init_from")
        model = Transformer(asked)  # with the asked attn_impl and dropout, and the loaded weights
        model.load_state_dict(loaded.state_dict())
    else:
        config = ModelConfig.from_dict({**cfg.model, "vocab_size": Tokenizer(tokenizer_path).vocab_size},
                                       where="model settings")
        torch.manual_seed(cfg.seed)
        model = Transformer(config)
    return model.to(device)


def data_tokenizer(cfg, kind: str) -> Path:
    """The tokenizer.model of the shard directory cfg.data (of `kind`: pretrain, sft, dpo), after
    checking that it is the tokenizer of the model in cfg.init_from: token ids from another
    vocabulary would train without error into nonsense. SFT, DPO and GRPO need an --init_from. GRPO
    (kind "grpo") reads text prompts, not shards: its tokenizer is the --init_from model's own."""
    if kind != "pretrain" and not cfg.init_from:
        raise user_error("command line", "--init_from is required", f"pass the model directory to start from, "
                         f"e.g. --init_from {'out/pretrain/latest' if kind == 'sft' else 'out/sft/latest'}")
    model_tok_path = Path(cfg.init_from) / "tokenizer.model"
    if cfg.init_from and not model_tok_path.is_file():
        what = "missing" if Path(cfg.init_from).is_dir() else "no such model directory"
        raise user_error(model_tok_path, what, "--init_from takes a model directory written by training")
    if kind == "grpo":
        return model_tok_path
    if not cfg.data:
        raise user_error("command line", "--data is required", f"a shard directory of python -m data.prepare --kind {kind}")
    read_meta(cfg.data, kind)  # a clear error for a missing directory or one of another kind
    data_tok_path = Path(cfg.data) / "tokenizer.model"
    if not data_tok_path.is_file():
        raise user_error(data_tok_path, "missing", "a shard directory holds the tokenizer.model that made it")
    if cfg.init_from:
        data_tok, model_tok = Tokenizer(data_tok_path), Tokenizer(model_tok_path)
        if data_tok.sha256 != model_tok.sha256:
            raise user_error(data_tok_path, f"the data was tokenized with another tokenizer than the model in "
                             f"{cfg.init_from} (vocab {data_tok.vocab_size} vs {model_tok.vocab_size})",
                             f"prepare the data with --tokenizer {model_tok_path}")
    return data_tok_path


def make_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (linear and embedding weights), never on norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # the fused CUDA kernel updates every tensor in one launch instead of several per tensor
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def lr_at(step: int, cfg) -> float:
    """Linear warmup over warmup_steps, then cosine decay from lr to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr

# -----------------------------------------------------------------------------
# one small collective per step: the mean loss, and whether any rank was asked to stop


def reduce_step(dist: Dist, stop_requested: bool, **values: torch.Tensor) -> tuple[dict[str, float], bool]:
    """Each scalar in `values` (loss, grad_norm, ...) averaged over ranks, and whether any rank got
    SIGINT/SIGTERM, in one small all-reduce per step. That is what lets all ranks agree to stop
    after the same step (a signal may reach only some of them) and all see the same NaN, at the
    cost of one sync per step."""
    device = next(iter(values.values())).device
    flag = torch.tensor([float(stop_requested)], device=device)
    t = torch.cat([v.detach().float().reshape(-1) for v in values.values()] + [flag])
    if dist.ddp:
        torch_dist.all_reduce(t)
    t = t.cpu() / dist.world_size  # one device sync; a value that is not a scalar (an MoE's tokens
    parts = t.split([v.numel() for v in values.values()] + [1])  # per expert) comes back as a list
    return {k: p.view(v.shape).tolist() for (k, v), p in zip(values.items(), parts)}, parts[-1].item() > 0


def check_finite(loss: float, grad_norm: float, step: int, out_dir: str, dtype: torch.dtype) -> None:
    """A NaN/inf loss or gradient stops the run before the optimizer step can spread it into the
    weights. In fp16 an inf gradient is routine (the GradScaler skips that step and lowers the
    scale), so there only the loss is checked."""
    bad = [f"{name} is {v}" for name, v in (("loss", loss), ("gradient norm", grad_norm))
           if not math.isfinite(v) and (name == "loss" or dtype != torch.float16)]
    if bad:
        raise user_error(out_dir, f"{' and '.join(bad)} at step {step}; stopped before updating the weights",
                         "the last checkpoint is intact: lower --lr, raise --warmup_steps, "
                         "or use --dtype=bfloat16, then --resume")


class StopFlag:
    """SIGINT/SIGTERM only set a flag: the loop finishes its step, saves and exits 0. A second
    Ctrl-C stops at once (without saving), for the impatient."""

    def __init__(self, verbose: bool):
        self.requested, self.verbose = False, verbose
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if self.verbose:
            print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                  "(Ctrl-C again to quit now)", file=sys.stderr, flush=True)

# -----------------------------------------------------------------------------
# the parts of the loop every script shares: start, the step tail, the cadence, the end


@dataclass
class Run:
    """What a training loop carries besides its own math. start_run builds it; step_tail,
    after_step and end_run read and update it."""
    cfg: TrainConfig
    dist: Dist
    dtype: torch.dtype            # the compute dtype under ctx
    ctx: typing.ContextManager    # model.autocast(device, dtype), entered around forward passes
    raw_model: Transformer        # what is saved and evaluated
    model: torch.nn.Module        # what trains: raw_model, compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    start_step: int
    tokenizer_path: Path
    flops_per_token: float        # for MFU: training FLOPs per computed position
    logger: "Logger"
    stop: "StopFlag"
    stop_now: bool = False        # set by step_tail when any rank was asked to stop
    clock: float = 0.0            # when the current step started (eval and save time not counted)
    timed: list = field(default_factory=lambda: [0, 0, 0.0])   # steps, positions, seconds since the last log line
    totals: list = field(default_factory=lambda: [0, 0.0])     # positions, seconds in this process's run


def start_run(cfg: TrainConfig, model: Transformer, dist: Dist, tokenizer_path: Path,
              flops_per_token: float | None = None) -> Run:
    """What every training run does before its loop: the compute dtype and autocast context, AdamW
    and the GradScaler for `model`, restored from OUT_DIR's newest good checkpoint with --resume,
    the compile/DDP wrappers, the logger and the SIGINT/SIGTERM flag. Rank 0 clears temp
    directories a killed save left behind and prints the resolved config. flops_per_token
    defaults to the model's at its full context (model.flops_per_token)."""
    dtype = pick_dtype(cfg.dtype, dist.device)
    optimizer = make_optimizer(model, cfg, dist.device)
    scaler = grad_scaler(dist.device, dtype)
    torch.manual_seed(cfg.seed + dist.rank)  # dropout masks differ between ranks
    start_step = 0
    if cfg.resume:
        start_step, _ = resume(cfg.out_dir, model, optimizer, scaler, tokenizer_path, dist)
    if dist.is_main:
        remove_temp_dirs(cfg.out_dir)
        print_config(cfg, model.config)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{model.num_params() / 1e6:.2f}M parameters{f' from {cfg.init_from}' if cfg.init_from else ''}"
              f"{f' ({trainable:,} trainable)' if trainable < model.num_params() else ''}, "
              f"{dist.world_size} rank(s) on {dist.device}, {dtype}")
    wrapped = torch.compile(model) if cfg.compile else model
    if dist.ddp:
        wrapped = DDP(wrapped, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    run = Run(cfg, dist, dtype, autocast(dist.device, dtype), model, wrapped, optimizer, scaler, start_step,
              tokenizer_path, flops_per_token or model.flops_per_token(model.config.block_size),
              Logger(cfg.out_dir, dist, start_step, cfg.max_steps), StopFlag(verbose=dist.is_main),
              clock=time.perf_counter())
    set_router_loss_scale(run)
    return run


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch tensor on the device; from pinned memory on CUDA, so the copy overlaps with compute."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def grad_sync(run: Run, last_micro_step: bool):
    """DDP all-reduces gradients at every backward; between micro-steps that is wasted traffic, so
    it happens only at the last one."""
    return run.model.no_sync() if run.dist.ddp and not last_micro_step else nullcontext()


def step_tail(run: Run, step: int, **values: torch.Tensor) -> dict[str, float]:
    """Everything between the last backward and the next step: unscale the fp16 gradients, clip,
    average `values` (the step's loss and whatever else the script logs) over ranks together with
    the stop flag, refuse a NaN, step the optimizer, clear the gradients. Returns the averaged
    values and grad_norm, and for an MoE model its router losses, the tokens per expert
    (expert_frac, metrics.jsonl only) and expert_load: the busiest expert's share relative to an
    even split (1 = balanced, n_expert / k when every token goes to the same k). Sets run.stop_now when any rank was asked to stop."""
    run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the fp16-scaled ones
    params = [p for p in run.raw_model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, run.cfg.grad_clip or math.inf)
    values = {**values, **run.raw_model.router_stats()}  # {} for a dense model
    stats, run.stop_now = reduce_step(run.dist, run.stop.requested, **values, grad_norm=norm)
    if "expert_frac" in stats:
        stats["expert_load"] = max(map(max, stats["expert_frac"])) * run.raw_model.config.n_expert
    try:
        check_finite(stats["loss"], stats["grad_norm"], step + 1, run.cfg.out_dir, run.dtype)
    except NanozhError:
        run.logger.close("")  # the bar's last line goes before the error, which must end the output
        raise
    run.scaler.step(run.optimizer)  # skipped by the fp16 scaler if a gradient overflowed
    run.scaler.update()
    set_router_loss_scale(run)
    run.optimizer.zero_grad(set_to_none=True)
    return stats


def set_router_loss_scale(run: Run) -> None:
    """An MoE's router losses reach the gradients inside backward (model.RouterLoss), so they must
    be scaled as the scripts scale their losses: by 1 / grad_accum (each script's loss is a mean
    over its micro-steps) and by the fp16 GradScaler's current scale (1 when it is off)."""
    run.raw_model.set_router_loss_scale(run.scaler.get_scale() / run.cfg.grad_accum)


def evaluate(run: Run, step: int, evaluate_fn: typing.Callable[[], dict]) -> None:
    """Log the metrics evaluate_fn returns, computed in eval mode (no dropout), without gradients,
    under autocast. Every rank calls it (the scripts' evaluations all-reduce their sums). Nothing
    when --eval_every=0 (never evaluate)."""
    if not run.cfg.eval_every:
        return
    run.raw_model.eval()
    with torch.no_grad(), run.ctx:
        metrics = evaluate_fn()
    run.raw_model.train()
    run.logger.log(step, **metrics)


def after_step(run: Run, step: int, stats: dict[str, float], lr: float, positions: int,
               evaluate_fn: typing.Callable[[], dict] | None, **extra) -> bool:
    """The cadence after optimizer step number `step` (counted from 1): a log line every log_every
    steps, an evaluation every eval_every, a checkpoint every save_every, and all three at the end
    and when a stop was requested. positions: the positions the model computed in this step on all
    ranks (padding included: it is what the device did), from which tokens/s and MFU are
    computed, the same way for every script. Returns True when the loop must stop now."""
    cfg, now = run.cfg, time.perf_counter()
    seconds = now - run.clock
    run.timed = [run.timed[0] + 1, run.timed[1] + positions, run.timed[2] + seconds]
    run.totals = [run.totals[0] + positions, run.totals[1] + seconds]
    run.logger.update()
    last = step == cfg.max_steps or run.stop_now
    if step % cfg.log_every == 0 or last:
        steps, pos, secs = run.timed
        tok_s = pos / secs
        run.logger.log(step, **stats, lr=lr, **extra, tok_s=tok_s, mfu=mfu(run.flops_per_token, tok_s, run.dist),
                       mem_gib=memory_gib(run.dist.device), ms=1000 * secs / steps)
        run.timed = [0, 0, 0.0]
    if evaluate_fn is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
        evaluate(run, step, evaluate_fn)
    if step % cfg.save_every == 0 or last:
        path = save_checkpoint(cfg.out_dir, step, run.raw_model, run.optimizer, run.scaler, cfg, run.tokenizer_path,
                               run.dist)
        run.logger.print(f"saved {path}")
    run.clock = time.perf_counter()
    return run.stop_now


def end_run(run: Run, step: int, what: str, detail: str = "") -> None:
    """The closing summary line: what was done, how fast, where the model is."""
    done = step - run.start_step
    summary = f"nothing to do: the checkpoint is at step {step} and max_steps is {run.cfg.max_steps} (raise --max_steps)"
    if done:
        positions, seconds = run.totals
        summary = (f"{what} {done} steps to step {step} ({positions:,} positions in {seconds:.0f}s, "
                   f"{positions / seconds:,.0f}/s){detail}, model in {Path(run.cfg.out_dir) / 'latest'}")
    run.logger.close(summary)


# -----------------------------------------------------------------------------
# checkpoints: OUT_DIR/step_NNNNNNN/ written to a temp dir, fsync'd, renamed; `latest` updated last


def _step_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints in out_dir, newest first (temp dirs never match the name)."""
    dirs = [p for p in out_dir.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]), reverse=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(out_dir: str, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, cfg, tokenizer_path: Path, dist: Dist,
                    extra: dict | None = None) -> Path | None:
    """Write OUT_DIR/step_NNNNNNN (the state after `step` optimizer steps) and point `latest` at it.
    Every rank must call it (the RNG states of all ranks are gathered); only rank 0 writes.
    `model` is the bare Transformer, not the DDP/compiled wrapper."""
    rng = [_rng_state(dist.device)]
    if dist.ddp:
        rng = [None] * dist.world_size
        torch_dist.all_gather_object(rng, _rng_state(dist.device))
        rng = [{k: v.cpu() for k, v in r.items()} for r in rng]
    if not dist.is_main:
        return None
    out = Path(out_dir)
    final, tmp = out / f"step_{step:07d}", out / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save(tmp)
    shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
    (tmp / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2, ensure_ascii=False) + "\n")
    state = {"step": step, "world_size": dist.world_size, "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "rng": rng, "extra": extra or {}}
    torch.save(state, tmp / "train_state.pt")
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if final.exists():  # left by a run that went past this step, then was resumed from an earlier one
        _remove(final)
    tmp.rename(final)
    _point_latest(final)
    _prune(out, step, cfg.keep_last)
    return final


def _point_latest(ckpt: Path) -> None:
    """Make OUT_DIR/latest a relative symlink to ckpt (so the run directory can be moved or copied),
    replacing the old link in one rename."""
    link = ckpt.parent / ".latest.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(ckpt.name)
    os.replace(link, ckpt.parent / "latest")
    _fsync(ckpt.parent)


def _prune(out: Path, step: int, keep_last: int) -> None:
    """Keep the newest keep_last checkpoints up to `step`. Newer ones can only be leftovers a resume
    skipped (unreadable); they are left alone and replaced when the run reaches their step."""
    if keep_last > 0:
        older = [p for p in _step_dirs(out) if int(p.name[5:]) < step]
        for p in older[keep_last - 1:]:
            _remove(p)


def _remove(ckpt: Path) -> None:
    """Delete a checkpoint directory by renaming it out of the step_* namespace first: a kill in
    the middle of rmtree must not leave a half-deleted step_* that looks like a checkpoint."""
    trash = ckpt.with_name(f".old_{ckpt.name}")
    shutil.rmtree(trash, ignore_errors=True)
    ckpt.rename(trash)
    shutil.rmtree(trash)


def remove_temp_dirs(out_dir: str) -> None:
    """Clear half-written checkpoints left by a run killed mid-save (never read: they are not step_*)."""
    for p in Path(out_dir).glob(".tmp_step_*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in Path(out_dir).glob(".old_step_*"):
        shutil.rmtree(p, ignore_errors=True)


def check_same_tokenizer(model_tokenizer: Path, data_tokenizer: Path) -> None:
    if not model_tokenizer.exists():
        raise user_error(model_tokenizer, "no tokenizer.model beside the model",
                         "copy the tokenizer it was trained with here")
    if file_sha256(model_tokenizer) != file_sha256(data_tokenizer):
        raise user_error(model_tokenizer, f"the model was trained with a different tokenizer than {data_tokenizer}",
                         "train on data prepared with the model's tokenizer, or start a new --out_dir")


def _read_checkpoint(ckpt: Path) -> tuple[Transformer, dict]:
    """The model and train state of one checkpoint directory; NanozhError naming the file if any
    part is missing or unreadable."""
    for name in ("tokenizer.model", "train_state.pt"):
        if not (ckpt / name).is_file():
            raise user_error(ckpt / name, "missing")
    weights = load_model(ckpt)
    try:
        state = torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip or garbage bytes: torch raises several kinds
        raise user_error(ckpt / "train_state.pt", f"unreadable, truncated or corrupted ({type(e).__name__})") from None
    return weights, state


def check_same_model(config_path: Path, saved: ModelConfig, ours: ModelConfig, ignore: tuple = ("attn_impl",),
                     fix: str = "resume with the model settings it was saved with, or use a new --out_dir") -> None:
    """A checkpoint of another model is another run, not a damaged one: an error, never skipped."""
    a, b = asdict(saved), asdict(ours)
    diff = [f"{k} {a[k]} != {b[k]}" for k in a if k not in ignore and a[k] != b[k]]
    if diff:
        raise user_error(config_path, f"the checkpoint's model differs from this run's ({', '.join(diff)})", fix)


def check_out_dir(out_dir: str, resume: bool) -> None:
    """A fresh run into a directory of checkpoints would mix two runs (and --resume would later pick
    the wrong one's newest), so it is refused."""
    if not resume and _step_dirs(Path(out_dir)):
        raise user_error(out_dir, "already holds checkpoints",
                         "add --resume to continue that run, or use a new --out_dir")


def resume(out_dir: str, model: Transformer, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
           tokenizer_path: Path, dist: Dist) -> tuple[int, dict]:
    """Load the newest readable checkpoint in out_dir into model, optimizer, scaler and the RNGs;
    returns (step, extra). Unreadable checkpoints (a disk error, a copy cut short) are reported on
    stderr and the previous one is used; a checkpoint of another model or tokenizer is an error."""
    dirs = _step_dirs(Path(out_dir))
    if not dirs:
        raise user_error(out_dir, "--resume but no checkpoint here", "check --out_dir, or drop --resume to start fresh")
    for ckpt in dirs:
        try:
            weights, state = _read_checkpoint(ckpt)
            break
        except NanozhError as e:
            if dist.is_main:
                print(f"{e} -- skipping {ckpt.name}, trying the checkpoint before it", file=sys.stderr)
    else:
        raise user_error(out_dir, "no readable checkpoint", "see the messages above; start a new --out_dir")
    check_same_tokenizer(ckpt / "tokenizer.model", tokenizer_path)
    # the attention implementation changes how, not what, is computed: resuming on another is fine
    check_same_model(ckpt / "config.json", weights.config, model.config)
    saved, ours = weights.state_dict(), model.state_dict()
    if saved.keys() != ours.keys() or any(saved[k].shape != ours[k].shape for k in saved):
        raise user_error(ckpt, "the checkpoint holds other weights than this run's model (LoRA on or off, another rank "
                         "or other targets)", "resume with the settings in its train_config.json, or use a new --out_dir")
    model.load_state_dict(saved)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    if len(state["rng"]) == dist.world_size:
        rng = state["rng"][dist.rank]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and dist.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], dist.device)
    elif dist.is_main:
        print(f"resuming on {dist.world_size} ranks a run saved on {len(state['rng'])}: "
              "random streams (dropout) restart from the seed", file=sys.stderr)
    if dist.is_main:
        print(f"resumed from {ckpt} (step {state['step']})")
        latest = Path(out_dir) / "latest"
        if not latest.is_symlink() or os.readlink(latest) != ckpt.name:
            # killed between a checkpoint's rename and the link update, or the newest was unreadable:
            # a run with nothing left to do must still leave `latest` at the model it resumed
            _point_latest(ckpt)
    return state["step"], state["extra"]

# -----------------------------------------------------------------------------
# logging: a line per logged step, a tqdm bar, OUT_DIR/metrics.jsonl; MFU and memory

# dense bf16/fp16 tensor-core peak, TFLOP/s, matched against torch.cuda.get_device_name()
PEAK_TFLOPS = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("H800", 989), ("GH200", 989),
               ("B200", 2250), ("A100", 312), ("A800", 312), ("L40S", 362), ("A6000", 155), ("A10G", 125),
               ("A10", 125), ("L4", 121), ("4090", 165), ("3090", 71), ("V100", 125), ("T4", 65)]


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS if key in name), None)


def mfu(flops_per_token: float, tokens_per_s: float, dist: Dist) -> float | None:
    """Model FLOPs utilisation: the FLOPs the model needs per token (Transformer.flops_per_token:
    6 x matmul params + the attention term) x measured tokens/s, over the peak of all GPUs."""
    peak = peak_flops(dist.device)
    return None if peak is None else flops_per_token * tokens_per_s / (peak * dist.world_size)


def memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated by tensors, or on CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _fmt(key: str, value) -> str:
    if value is None:
        return f"{key} n/a"
    if key == "lr":
        return f"lr {value:.2e}"
    if key == "tok_s":
        return f"{value / 1e3:.1f}k tok/s"
    if key == "mfu":
        return f"mfu {100 * value:.1f}%"
    if key == "mem_gib":
        return f"mem {value:.2f}GiB"
    if key == "ms":
        return f"{value:.0f}ms"
    return f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"


class Logger:
    """Rank 0's log: a tqdm bar over the steps, a printed line per logged step and one JSON object
    per line in OUT_DIR/metrics.jsonl. On resume, lines past the checkpoint's step (logged by the
    run that was interrupted, and about to be redone) are dropped, so the file reads as one run; a
    run starting from step 0 starts the file afresh."""

    def __init__(self, out_dir: str, dist: Dist, start_step: int, max_steps: int):
        self.active = dist.is_main
        self.path = Path(out_dir) / "metrics.jsonl"
        if self.active:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # a kill while a line was being appended leaves it cut short: only the last line can be
            old = read_jsonl(self.path, skip_bad_last_line=True) if self.path.exists() and start_step else []
            kept = [r for _, r in old if r.get("step", 0) <= start_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.bar = tqdm(total=max_steps, initial=start_step, disable=not self.active, unit="step",
                        dynamic_ncols=True, file=sys.stderr)

    def log(self, step: int, **metrics) -> None:
        if not self.active:
            return
        # lists (an MoE's tokens per expert and layer) are for metrics.jsonl, too long for the line
        self.bar.write(" | ".join([f"step {step}"] + [_fmt(k, v) for k, v in metrics.items() if not isinstance(v, list)]))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def print(self, text: str) -> None:
        if self.active:
            self.bar.write(text)

    def update(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def close(self, summary: str = "") -> None:
        self.bar.close()
        if self.active and summary:
            print(summary)
