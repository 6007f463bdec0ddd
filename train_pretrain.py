"""Pretrain a model: next-token prediction on the token shards of data/prepare.py --kind pretrain.

    python train_pretrain.py --config configs/tiny.json --data out/data/pretrain --out_dir out/pretrain
    python train_pretrain.py --config configs/tiny.json --data DIR --out_dir DIR --resume   # continue where it stopped
    torchrun --standalone --nproc_per_node=8 train_pretrain.py --config configs/100m.json --data DIR --out_dir DIR
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 --nproc_per_node=8 train_pretrain.py ...

Settings: the PretrainConfig defaults (trainer.TrainConfig), then --config FILE (JSON), then
--key=value flags, model settings as --model.n_layer=4; the resolved config is printed and saved in
every checkpoint. --init_from DIR starts from a model directory instead of random weights.

Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and exits 0 (torchrun passes a
SIGTERM on to its workers, then kills them after its shutdown timeout, 30 s by default); --resume
then continues exactly where it stopped: the batch of every step is a pure function of the step
number, so the losses are those of a run that was never interrupted. OUT_DIR/latest is a model
directory for sample.py, eval.py and train_sft.py --init_from.
"""

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP

import trainer
from data.loaders import PretrainLoader
from errors import user_error
from eval import nll_of_tokens


@dataclass
class PretrainConfig(trainer.TrainConfig):
    out_dir: str = "out/pretrain"
    eval_tokens: int = 1 << 20    # validation tokens scored at each evaluation (the val split's first ones)


def validation_loss(model: torch.nn.Module, tokens: torch.Tensor, block_size: int, batch_size: int,
                    ctx, dist: trainer.Dist) -> float:
    """Mean NLL per token of the validation tokens, scored like eval.py does (the same function), in
    non-overlapping windows of block_size: the same windows the training loss sees. Each rank scores
    its own run of whole windows and the sums are added up."""
    per_rank = math.ceil((len(tokens) - 1) / dist.world_size / block_size) * block_size
    mine = tokens[dist.rank * per_rank: (dist.rank + 1) * per_rank + 1]
    with ctx:
        nll, count = nll_of_tokens(model, mine, context=block_size, stride=block_size, batch_size=batch_size)
    totals = torch.tensor([nll, count], dtype=torch.float64, device=dist.device)
    if dist.ddp:
        torch_dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


def train(cfg: PretrainConfig) -> None:
    dist = trainer.init_distributed(cfg.device)
    dtype = trainer.resolve_dtype(cfg.dtype, dist.device)
    ctx = trainer.autocast(dist.device, dtype)
    tokenizer_path = Path(cfg.data) / "tokenizer.model"
    if not cfg.data or not tokenizer_path.is_file():
        raise user_error(cfg.data or "--data", "not a shard directory with a tokenizer.model",
                         "--data DIR written by data/prepare.py --kind pretrain")
    trainer.check_out_dir(cfg.out_dir, cfg.resume)
    model = trainer.build_model(cfg, tokenizer_path, dist.device)
    block_size = model.config.block_size
    loader = PretrainLoader(cfg.data, "train", block_size, cfg.batch_size, cfg.seed)
    val_tokens = PretrainLoader(cfg.data, "val", block_size, cfg.batch_size, cfg.seed).val_tokens(cfg.eval_tokens)
    optimizer, scaler, start_step = trainer.start_run(cfg, model, dist, dtype, tokenizer_path)
    if dist.is_main:
        print(f"{model.num_params() / 1e6:.2f}M parameters, {dist.world_size} rank(s) on {dist.device}, {dtype}")
    raw_model = model  # what gets saved and evaluated: no compile/DDP wrappers
    if cfg.compile:
        model = torch.compile(model)
    if dist.ddp:
        model = DDP(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)

    tokens_per_step = cfg.batch_size * block_size * cfg.grad_accum * dist.world_size
    flops_per_token = raw_model.flops_per_token(block_size)
    logger = trainer.Logger(cfg.out_dir, dist, start_step, cfg.max_steps)
    stop = trainer.StopFlag(verbose=dist.is_main)

    def get_batch(step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = loader.get_batch(step, micro_step, dist.rank, dist.world_size, cfg.grad_accum)
        if dist.device.type == "cuda":  # pinned memory lets the copy overlap with compute
            return x.pin_memory().to(dist.device, non_blocking=True), y.pin_memory().to(dist.device, non_blocking=True)
        return x, y

    def evaluate(step: int) -> None:
        val = validation_loss(raw_model, val_tokens, block_size, cfg.batch_size, ctx, dist)
        logger.log(step, val_loss=val)

    if start_step == 0 and cfg.eval_every:
        evaluate(0)
    step, stats = start_step, {}
    train_time, timed_steps, run_time = 0.0, 0, 0.0  # since the last log line, and in all
    x, y = get_batch(step, 0)
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        lr = trainer.lr_at(step, cfg)
        trainer.set_lr(optimizer, lr)
        loss_sum = torch.zeros((), device=dist.device)
        for micro_step in range(cfg.grad_accum):
            # gradients are all-reduced across ranks only after the last micro-step
            last = micro_step == cfg.grad_accum - 1
            with model.no_sync() if dist.ddp and not last else nullcontext():
                with ctx:
                    _, loss = model(x, y)
                    loss = loss / cfg.grad_accum  # the gradient of the mean over micro-steps
                # fetch the next micro-batch (this step's next, or the next step's first) while the
                # device works on this one
                x, y = get_batch(*((step + 1, 0) if last else (step, micro_step + 1)))
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or math.inf)
        stats, stop_now = trainer.reduce_step(dist, stop.requested, loss=loss_sum, grad_norm=norm)
        trainer.check_finite(stats["loss"], stats["grad_norm"], step + 1, cfg.out_dir, dtype)
        scaler.step(optimizer)  # skipped by the fp16 scaler if a gradient overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        train_time += time.perf_counter() - t0
        run_time += time.perf_counter() - t0
        timed_steps += 1
        logger.update()

        if step % cfg.log_every == 0 or step == cfg.max_steps or stop_now:
            tok_s = timed_steps * tokens_per_step / train_time
            logger.log(step, **stats, lr=lr, tok_s=tok_s,
                       mfu=trainer.mfu(flops_per_token, tok_s, dist), mem_gib=trainer.memory_gib(dist.device),
                       ms=1000 * train_time / timed_steps)
            train_time, timed_steps = 0.0, 0
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            evaluate(step)
        if step % cfg.save_every == 0 or step == cfg.max_steps or stop_now:
            path = trainer.save_checkpoint(cfg.out_dir, step, raw_model, optimizer, scaler, cfg, tokenizer_path, dist)
            logger.print(f"saved {path}")
        if stop_now:
            break

    done = step - start_step
    summary = f"nothing to do: the checkpoint is at step {step} and max_steps is {cfg.max_steps} (raise --max_steps)"
    if done:
        summary = (f"pretrained {done} steps ({done * tokens_per_step:,} tokens, {done * tokens_per_step / run_time:,.0f}"
                   f" tokens/s) to step {step}: loss {stats['loss']:.4f}, model in {Path(cfg.out_dir) / 'latest'}")
    logger.close(summary)
    trainer.cleanup_distributed(wait=True)


def main() -> None:
    trainer.run(PretrainConfig, train, sys.argv[1:])


if __name__ == "__main__":
    main()
