"""Supervised fine-tuning (SFT): teach a pretrained model to chat, with loss on assistant tokens only.

    python train_sft.py --init_from out/pretrain/latest --data out/data/sft --out_dir out/sft
    torchrun --standalone --nproc_per_node=8 train_sft.py --init_from out/pretrain/latest --data DIR --out_dir DIR
    python train_sft.py --init_from out/pretrain/latest --data out/data/sft --out_dir out/sft --resume

--data is a shard directory of data/prepare.py --kind sft, made with the model's own tokenizer.
Settings, checkpoints, resume, Ctrl-C/SIGTERM, logging and torchrun work as in train_pretrain.py;
the model comes from --init_from (of the --model.key settings only attn_impl and dropout may
differ from it). OUT_DIR/latest is a chat model directory for sample.py --chat, eval.py and
train_dpo.py --init_from.

What the model learns: each conversation is rendered with the one chat template
(Tokenizer.render_chat), and only the tokens the assistant writes carry loss: the content of every
assistant turn and its <|im_end|> (so it learns when to stop). System and user text, role headers
and padding are context only (target -1).

Batches hold whole conversations, padded to the batch's longest, with conversations of similar
length bucketed together (data/loaders.py), rather than packed end to end into full rows. Packing
wastes no positions, but conversations sharing a row must not attend to each other, which needs a
block-diagonal mask (or per-sequence lengths) in the attention kernel; the fused kernel here is
causal only. With bucketing the padding is a few percent (logged as `pad`, the fraction of
computed positions that are padding), which is a small price for one attention path and rows that
are each exactly one conversation.

The loss is a mean over assistant tokens, and it is the same mean however the step is split into
micro-steps and ranks: each micro-batch contributes sum(token losses) / N, where N is the number of
loss tokens of the whole step on all ranks (counted before the forward, since every batch is known
in advance). The alternative, a mean per micro-batch averaged over micro-steps, gives a short
answer's tokens more weight than a long one's whenever two micro-batches hold different numbers of
assistant tokens; with the global count, grad_accum=2 or 2 ranks compute exactly the gradient of
one big batch.
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
from data.loaders import SFTLoader
from data.shards import read_meta


@dataclass
class SFTConfig(trainer.TrainConfig):
    out_dir: str = "out/sft"
    max_steps: int = 0            # 0 = as many steps as `epochs` passes over the train split take
    epochs: float = 3.0
    batch_size: int = 16          # conversations per micro-step on each rank
    # fine-tuning, not learning from scratch: a gentler peak than pretraining's 6e-4, and no weight
    # decay, which would pull the pretrained weights towards zero rather than regularise
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 20
    weight_decay: float = 0.0
    eval_every: int = 100
    save_every: int = 250
    eval_batches: int = 50        # validation batches scored at each evaluation (the same ones each time)


def validation_loss(model: torch.nn.Module, loader: SFTLoader, n_batches: int, ctx, dist: trainer.Dist) -> float:
    """Mean NLL per assistant token over the val split's first n_batches batches (the same ones at
    every evaluation), in eval mode. Ranks score every world_size-th batch and add up the sums."""
    totals = torch.zeros(2, dtype=torch.float64, device=dist.device)
    model.eval()
    with torch.no_grad(), ctx:
        for pos in range(dist.rank, n_batches, dist.world_size):
            x, y = (t.to(dist.device) for t in loader.get_batch(pos))
            _, nll = model(x, y, reduction="none")
            totals += torch.stack([nll.sum().double(), (y != -1).sum().double()])
    model.train()
    if dist.ddp:
        torch_dist.all_reduce(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()


def train(cfg: SFTConfig) -> None:
    dist = trainer.init_distributed(cfg.device)
    dtype = trainer.resolve_dtype(cfg.dtype, dist.device)
    ctx = trainer.autocast(dist.device, dtype)
    tokenizer_path = trainer.check_data_tokenizer(cfg.data, cfg.init_from, "sft")
    trainer.check_out_dir(cfg.out_dir, cfg.resume)
    model = trainer.build_model(cfg, tokenizer_path, dist.device)
    block_size = model.config.block_size
    loader = SFTLoader(cfg.data, "train", cfg.batch_size, cfg.seed, max_len=block_size)
    has_val = read_meta(cfg.data, "sft")["splits"]["val"]["examples"] > 0
    val_loader = SFTLoader(cfg.data, "val", cfg.batch_size, cfg.seed, max_len=block_size) if has_val else None
    epochs_per_step = cfg.grad_accum * dist.world_size / loader.n_batches
    if cfg.max_steps == 0:
        cfg.max_steps = trainer.max_steps_for(cfg.epochs, loader.n_batches, cfg, dist)
    optimizer, scaler, start_step = trainer.start_run(cfg, model, dist, dtype, tokenizer_path)
    if dist.is_main:
        n_cut = int((loader.lengths > block_size + 1).sum())
        print(f"{model.num_params() / 1e6:.2f}M parameters from {cfg.init_from}, {dist.world_size} rank(s) on "
              f"{dist.device}, {dtype}; {len(loader.lengths):,} train conversations, {cfg.max_steps} steps "
              f"= {cfg.max_steps * epochs_per_step:.2f} epochs")
        if n_cut:
            print(f"{n_cut:,} conversations are longer than block_size {block_size} and are cut there; "
                  f"what is cut carries no loss (prepare with --max_len {block_size} to cut at a turn boundary)")
        if not has_val:
            print("the val split is empty: no validation loss (prepare with a larger --val_fraction)")
    raw_model = model  # what gets saved and evaluated: no compile/DDP wrappers
    if cfg.compile:
        model = torch.compile(model)
    if dist.ddp:
        model = DDP(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)

    logger = trainer.Logger(cfg.out_dir, dist, start_step, cfg.max_steps)
    stop = trainer.StopFlag(verbose=dist.is_main)

    def to_device(t: torch.Tensor) -> torch.Tensor:
        if dist.device.type == "cuda":  # pinned memory lets the copy overlap with compute
            return t.pin_memory().to(dist.device, non_blocking=True)
        return t

    def get_step(step: int) -> tuple[list, torch.Tensor]:
        """The micro-batches of one step, and [loss tokens, positions, padding positions] summed
        over the whole step on all ranks: the first is what the loss is divided by."""
        batches, counts = [], torch.zeros(3, dtype=torch.float64)
        for micro_step in range(cfg.grad_accum):
            x, y = loader.get_batch(step, micro_step, dist.rank, dist.world_size, cfg.grad_accum)
            counts += torch.tensor([(y != -1).sum().item(), x.numel(), loader.last_padding_fraction * x.numel()])
            batches.append((to_device(x), to_device(y)))
        counts = counts.to(dist.device)
        if dist.ddp:
            torch_dist.all_reduce(counts)
        return batches, counts

    def evaluate(step: int) -> None:
        if val_loader is not None:
            n_batches = min(cfg.eval_batches, val_loader.n_batches)
            logger.log(step, val_loss=validation_loss(raw_model, val_loader, n_batches, ctx, dist))

    if start_step == 0 and cfg.eval_every:
        evaluate(0)
    step, stats = start_step, {}
    train_time, timed_steps, run_time = 0.0, 0, 0.0  # since the last log line, and in all
    logged = torch.zeros(3, dtype=torch.float64, device=dist.device)  # counts since the last log line
    total = torch.zeros(3, dtype=torch.float64, device=dist.device)  # counts in all
    flops_per_token = raw_model.flops_per_token(block_size)  # an upper bound: most rows are shorter
    batches, counts = get_step(step)
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        lr = trainer.lr_at(step, cfg)
        trainer.set_lr(optimizer, lr)
        # DDP averages gradients over ranks; the world_size factor turns that average into the sum
        # that makes the whole step one mean over its loss tokens
        scale = dist.world_size / counts[0].clamp(min=1).float()
        logged += counts
        loss_sum = torch.zeros((), device=dist.device)
        for micro_step, (x, y) in enumerate(batches):
            # gradients are all-reduced across ranks only after the last micro-step
            last = micro_step == cfg.grad_accum - 1
            with model.no_sync() if dist.ddp and not last else nullcontext():
                with ctx:
                    _, nll = model(x, y, reduction="none")  # (B, T), 0 where y == -1
                    loss = nll.sum() * scale
                if last:  # fetch the next step's batches while the device works on this one
                    next_batches, next_counts = get_step(step + 1)
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        batches, counts = next_batches, next_counts
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or math.inf)
        # each rank's loss_sum is world_size x its share of the step's mean: the average is the mean
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
            n_loss, positions, padding = logged.tolist()
            tok_s = positions / train_time  # computed positions, padding included: what the device did
            logger.log(step, **stats, lr=lr, pad=padding / positions, loss_tokens=int(n_loss), tok_s=tok_s,
                       mfu=trainer.mfu(flops_per_token, tok_s, dist), mem_gib=trainer.memory_gib(dist.device),
                       ms=1000 * train_time / timed_steps)
            train_time, timed_steps = 0.0, 0
            total += logged
            logged.zero_()
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
        n_loss, positions, padding = total.tolist()
        summary = (f"fine-tuned {done} steps ({int(n_loss):,} assistant tokens in {int(positions):,} positions, "
                   f"{padding / positions:.1%} padding, {positions / run_time:,.0f} positions/s) to step {step} "
                   f"= {step * epochs_per_step:.2f} epochs of {len(loader.lengths):,} conversations: "
                   f"loss {stats['loss']:.4f}, model in {Path(cfg.out_dir) / 'latest'}")
    logger.close(summary)
    trainer.cleanup_distributed(wait=True)


def main() -> None:
    trainer.run(SFTConfig, train, sys.argv[1:])


if __name__ == "__main__":
    main()
