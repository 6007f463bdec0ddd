"""Supervised fine-tuning (SFT): teach a pretrained model to chat, with loss on assistant tokens only.

    python train_sft.py --init_from out/pretrain/latest --data out/data/sft --out_dir out/sft
    torchrun --standalone --nproc_per_node=8 train_sft.py --init_from out/pretrain/latest --data DIR --out_dir DIR
    python train_sft.py --init_from out/pretrain/latest --data out/data/sft --out_dir out/sft --resume
    python train_sft.py --init_from out/pretrain/latest --data out/data/sft --out_dir out/sft_lora --lora_rank 8

--data is a shard directory of data/prepare.py --kind sft, made with the model's own tokenizer.
Settings, checkpoints, resume, Ctrl-C/SIGTERM, logging and torchrun work as in train_pretrain.py;
the model comes from --init_from (of the --model.key settings only attn_impl and dropout may
differ from it). OUT_DIR/latest is a chat model directory for sample.py --chat, eval.py and
train_dpo.py --init_from. With --lora_rank R only low-rank adapters train (lora.py): checkpoints
then hold the adapters and name the base model, and OUT_DIR/latest loads as base + adapters.

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

import sys
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

import lora
import trainer
from data.loaders import SFTLoader


@dataclass
class SFTConfig(trainer.TrainConfig, lora.LoraSettings):
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


def validation_loss(model: torch.nn.Module, loader: SFTLoader, n_batches: int, dist: trainer.Dist) -> float:
    """Mean NLL per assistant token over the val split's first n_batches batches (the same ones at
    every evaluation). Ranks score every world_size-th batch and add up the sums."""
    totals = torch.zeros(2, dtype=torch.float64, device=dist.device)
    for pos in range(dist.rank, n_batches, dist.world_size):
        x, y = (t.to(dist.device) for t in loader.get_batch(pos))
        _, nll = model(x, y, reduction="none")
        totals += torch.stack([nll.sum().double(), (y != -1).sum().double()])
    if dist.ddp:
        torch_dist.all_reduce(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()


def train(cfg: SFTConfig) -> None:
    dist, tokenizer_path, model = trainer.setup(cfg, "sft")
    model = lora.setup(model, cfg, cfg.init_from, cfg.seed)  # --lora_rank > 0: frozen, with adapters
    loader, val_loader = SFTLoader.splits(cfg.data, cfg.batch_size, cfg.seed, max_len=model.config.block_size)
    cfg.max_steps = cfg.max_steps or loader.steps_for(cfg.epochs, cfg.grad_accum, dist.world_size)
    # MFU counts the FLOPs of a position at the full context: an upper bound, most rows are shorter
    run = trainer.start_run(cfg, model, dist, tokenizer_path)
    for line in loader.describe(cfg.max_steps, cfg.grad_accum, dist.world_size):
        run.logger.print(line)
    if val_loader is None:
        run.logger.print("the val split is empty: no validation loss (prepare with a larger --val_fraction)")

    def get_step(step: int) -> tuple[list, torch.Tensor]:
        """The (x, y) micro-batches of one step on this rank, on the device, and [loss tokens,
        positions, padding positions] summed over the whole step on all ranks: the first is what
        the loss is divided by (counted before the forward: every batch is known in advance)."""
        batches, counts = [], torch.zeros(3, dtype=torch.float64)
        for micro_step in range(cfg.grad_accum):
            x, y = loader.get_batch(step, micro_step, dist.rank, dist.world_size, cfg.grad_accum)
            counts += torch.tensor([(y != -1).sum().item(), x.numel(), loader.last_padding_fraction * x.numel()])
            batches.append((trainer.to_device(x, dist.device), trainer.to_device(y, dist.device)))
        counts = counts.to(dist.device)
        if dist.ddp:
            torch_dist.all_reduce(counts)
        return batches, counts

    def evaluate() -> dict:
        n_batches = min(cfg.eval_batches, val_loader.n_batches)
        return {"val_loss": validation_loss(model, val_loader, n_batches, dist)}

    if run.start_step == 0 and val_loader is not None:
        trainer.evaluate(run, 0, evaluate)  # the pretrained model: where the curves start
    step, (batches, counts) = run.start_step, get_step(run.start_step)
    while step < cfg.max_steps:
        lr = trainer.set_lr(run.optimizer, trainer.lr_at(step, cfg))
        # DDP averages gradients over ranks; the world_size factor turns that average into the sum
        # that makes the whole step one mean over its loss tokens
        scale = dist.world_size / counts[0].clamp(min=1).float()
        loss_sum = torch.zeros((), device=dist.device)
        for micro_step, (x, y) in enumerate(batches):
            last = micro_step == cfg.grad_accum - 1
            with trainer.grad_sync(run, last):
                with run.ctx:
                    _, nll = run.model(x, y, reduction="none")  # (B, T), 0 where y == -1
                    loss = nll.sum() * scale
                if last:  # fetch the next step's batches while the device works on this one
                    next_batches, next_counts = get_step(step + 1)
                run.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        # each rank's loss_sum is world_size x its share of the step's mean: the average is the mean
        stats = trainer.step_tail(run, step, loss=loss_sum)
        step += 1
        n_loss, positions, padding = counts.tolist()
        batches, counts = next_batches, next_counts
        if trainer.after_step(run, step, stats, lr, int(positions), evaluate if val_loader is not None else None,
                              pad=padding / positions, loss_tokens=int(n_loss)):
            break
    trainer.end_run(run, step, "fine-tuned", f" = {loader.epochs_at(step, cfg.grad_accum, dist.world_size):.2f} epochs of {len(loader.lengths):,} "
                    f"conversations: loss {stats['loss']:.4f}" if step > run.start_step else "")


def main() -> None:
    trainer.run(SFTConfig, train, sys.argv[1:])


if __name__ == "__main__":
    main()
