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
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

import trainer
from data.loaders import PretrainLoader
from eval import nll_of_tokens


@dataclass
class PretrainConfig(trainer.TrainConfig):
    out_dir: str = "out/pretrain"
    eval_tokens: int = 1 << 20    # validation tokens scored at each evaluation (the val split's first ones)


def validation_loss(model: torch.nn.Module, tokens: torch.Tensor, block_size: int, batch_size: int,
                    dist: trainer.Dist) -> float:
    """Mean NLL per token of the validation tokens, scored like eval.py does (the same function), in
    non-overlapping windows of block_size: the same windows the training loss sees. Each rank scores
    its own run of whole windows and the sums are added up."""
    per_rank = math.ceil((len(tokens) - 1) / dist.world_size / block_size) * block_size
    mine = tokens[dist.rank * per_rank: (dist.rank + 1) * per_rank + 1]
    nll, count = nll_of_tokens(model, mine, context=block_size, stride=block_size, batch_size=batch_size)
    totals = torch.tensor([nll, count], dtype=torch.float64, device=dist.device)
    if dist.ddp:
        torch_dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


def train(cfg: PretrainConfig) -> None:
    dist, tokenizer_path, model = trainer.setup(cfg, "pretrain")
    block_size = model.config.block_size
    loader = PretrainLoader(cfg.data, "train", block_size, cfg.batch_size, cfg.seed)
    val_tokens = PretrainLoader(cfg.data, "val", block_size, cfg.batch_size, cfg.seed).val_tokens(cfg.eval_tokens)
    run = trainer.start_run(cfg, model, dist, tokenizer_path)
    positions_per_step = cfg.batch_size * block_size * cfg.grad_accum * dist.world_size

    def get_step(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (x, y) micro-batches of one step on this rank, on the device."""
        return [tuple(trainer.to_device(t, dist.device) for t in
                      loader.get_batch(step, micro_step, dist.rank, dist.world_size, cfg.grad_accum))
                for micro_step in range(cfg.grad_accum)]

    def evaluate() -> dict:
        return {"val_loss": validation_loss(model, val_tokens, block_size, cfg.batch_size, dist)}

    if run.start_step == 0:
        trainer.evaluate(run, 0, evaluate)  # the untrained model: where the curves start
    step, batches = run.start_step, get_step(run.start_step)
    while step < cfg.max_steps:
        lr = trainer.set_lr(run.optimizer, trainer.lr_at(step, cfg))
        loss_sum = torch.zeros((), device=dist.device)
        for micro_step, (x, y) in enumerate(batches):
            last = micro_step == cfg.grad_accum - 1
            with trainer.grad_sync(run, last):
                with run.ctx:
                    _, loss = run.model(x, y)
                    loss = loss / cfg.grad_accum  # the gradient of the mean over micro-steps
                if last:  # fetch the next step's batches while the device works on this one
                    next_batches = get_step(step + 1)
                run.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        batches = next_batches
        stats = trainer.step_tail(run, step, loss=loss_sum)
        step += 1
        if trainer.after_step(run, step, stats, lr, positions_per_step, evaluate):
            break
    trainer.end_run(run, step, "pretrained", f": loss {stats['loss']:.4f}" if step > run.start_step else "")


def main() -> None:
    trainer.run(PretrainConfig, train, sys.argv[1:])


if __name__ == "__main__":
    main()
