"""Direct preference optimisation (DPO): make a chat model prefer the chosen answer over the rejected one.

    python train_dpo.py --init_from out/sft/latest --data out/data/dpo --out_dir out/dpo
    python train_dpo.py --init_from out/sft/latest --data out/data/dpo --out_dir out/dpo --precompute_ref
    torchrun --standalone --nproc_per_node=8 train_dpo.py --init_from out/sft/latest --data DIR --out_dir DIR
    python train_dpo.py --init_from out/sft/latest --data out/data/dpo --out_dir out/dpo --resume
    python train_dpo.py --init_from out/sft/latest --data out/data/dpo --out_dir out/dpo_lora --lora_rank 8

--data is a shard directory of data/prepare.py --kind dpo (prompt, chosen, rejected), made with the
model's tokenizer. Settings, checkpoints, resume, Ctrl-C/SIGTERM, logging and torchrun work as in
train_pretrain.py. OUT_DIR/latest is a chat model directory for sample.py --chat and eval.py.

The loss (Rafailov et al., 2023). Two copies of the --init_from model (normally the SFT model): the
policy, which trains, and the reference, which stays frozen. For a prompt with a chosen answer and a
rejected one, each model gives the summed log-probability of each answer's tokens (its <|im_end|>
included): pc, pr for the policy, rc, rr for the reference. Then

    loss = -logsigmoid(beta * ((pc - rc) - (pr - rr)))

The policy is pushed to raise the chosen answer and lower the rejected one *relative to the
reference*; beta sets how far it may drift from it (small beta: far). beta * (pc - rc) is the
"implicit reward" of the chosen answer (likewise for the rejected one); logged are the mean rewards,
their margin, the reward accuracy (the share of pairs whose chosen reward is strictly the higher) and the
policy's mean log-prob of each answer (a chosen log-prob that keeps falling is a known DPO failure:
both answers lose probability, the rejected one faster). --label_smoothing=eps is conservative DPO:
it assumes a share eps of the labels are flipped, -(1-eps)*logsigmoid(beta*z) - eps*logsigmoid(-beta*z),
so the margin stops growing at a finite value instead of being pushed forever.

The reference is the --init_from model in eval mode, requires_grad_(False), run under
torch.no_grad() and never given to the optimizer. With --precompute_ref its log-probs are computed
once, for every example of the train and val splits, kept in memory (a resumed run computes them
again), and the reference model is freed: one forward pass over the data up front, then each step
runs only the policy, and only one model's weights occupy memory. That pays off for runs of more
than one epoch, or when the second model does not fit; for a fraction of an epoch the live
reference does less work.

With --lora_rank R only low-rank adapters train (lora.py), and the reference is the same network
with its adapters switched off (lora.base_view): one model's weights in memory, not two.

Chosen and rejected answers go through the model in one forward: the loader gives B prompt+chosen
rows followed by B prompt+rejected rows. Each micro-step holds the same number of pairs, so the mean
loss per pair over micro-steps and ranks is the mean of their means.
"""

import sys
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from tqdm import tqdm

import lora
import trainer
from data.loaders import DPOLoader, position
from errors import user_error
from model import Transformer


@dataclass
class DPOConfig(trainer.TrainConfig, lora.LoraSettings):
    out_dir: str = "out/dpo"
    max_steps: int = 0            # 0 = as many steps as `epochs` passes over the train split take
    epochs: float = 1.0
    batch_size: int = 8           # preference pairs per micro-step on each rank (2x rows go through the model)
    # a small step: the policy starts at the reference and should move away from it only a little
    lr: float = 5e-6
    min_lr: float = 5e-7
    warmup_steps: int = 20
    weight_decay: float = 0.0
    beta: float = 0.1             # the strength of the pull back to the reference
    label_smoothing: float = 0.0  # conservative DPO: the assumed share of flipped labels, in [0, 0.5)
    precompute_ref: bool = False  # reference log-probs once up front, then free the reference model
    eval_every: int = 100
    save_every: int = 250
    eval_batches: int = 20        # validation batches scored at each evaluation (the same ones each time)


# what each step logs besides grad_norm, lr and speed: means over the step's pairs on all ranks
STEP_STATS = ("loss", "reward_acc", "chosen_reward", "rejected_reward", "margin", "logp_chosen", "logp_rejected")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss and the implicit rewards of the chosen and rejected answers (detached), from
    summed answer log-probs, each (B,). The loss is not yet averaged."""
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    z = (pc - rc) - (pr - rr)
    loss = -(1 - label_smoothing) * F.logsigmoid(beta * z) - label_smoothing * F.logsigmoid(-beta * z)
    return loss, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def answer_logps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-prob of each row's answer tokens, (rows,): the model's fp32 per-token NLL under the mask."""
    _, nll = model(x, y, reduction="none")
    return -(nll * answer_mask).sum(-1)


@torch.no_grad()
def precompute_reference(reference: Transformer, data: str, split: str, block_size: int, batch_size: int,
                         ctx, dist: trainer.Dist) -> torch.Tensor:
    """(n_examples, 2) reference log-probs of every pair's chosen and rejected answer in the split,
    indexed like loader.examples. A loader of batch size 1 visits each pair exactly once in its first
    epoch (sorted by length within windows, so neighbours pad little); batch_size of those go through
    the model at a time. Ranks take every world_size-th batch and the table is summed over ranks."""
    one = DPOLoader(data, split, batch_size=1, seed=0, max_len=block_size)
    n = len(one.examples)
    table = torch.zeros(n, 2, device=dist.device)
    starts = range(dist.rank * batch_size, n, batch_size * dist.world_size)
    for start in tqdm(starts, desc=f"reference log-probs ({split})", unit="batch", disable=not dist.is_main,
                      file=sys.stderr):
        batches = [one.get_batch(pos) for pos in range(start, min(start + batch_size, n))]
        T = max(x.shape[1] for x, _, _ in batches)
        x = torch.full((2 * len(batches), T), one.pad_id, dtype=torch.long)
        y = torch.full((2 * len(batches), T), -1, dtype=torch.long)
        mask = torch.zeros((2 * len(batches), T), dtype=torch.bool)
        for i, (bx, by, bm) in enumerate(batches):  # rows chosen, rejected, chosen, rejected, ...
            t = bx.shape[1]
            x[2 * i:2 * i + 2, :t], y[2 * i:2 * i + 2, :t], mask[2 * i:2 * i + 2, :t] = bx, by, bm
        with ctx:
            logps = answer_logps(reference, x.to(dist.device), y.to(dist.device), mask.to(dist.device))
        rows = [one.example_ids(pos)[0] for pos in range(start, start + len(batches))]
        table[rows] = logps.float().view(-1, 2)
    if dist.ddp:
        torch_dist.all_reduce(table)
    return table


def train(cfg: DPOConfig) -> None:
    if cfg.beta <= 0:
        raise user_error("command line", f"--beta={cfg.beta} must be positive", "0.1 is usual")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise user_error("command line", f"--label_smoothing={cfg.label_smoothing} is outside [0, 0.5)",
                         "it is the share of labels assumed flipped; 0 is plain DPO")
    dist, tokenizer_path, model = trainer.setup(cfg, "dpo")
    model = lora.setup(model, cfg, cfg.init_from, cfg.seed)  # --lora_rank > 0: frozen, with adapters
    # the reference: the same start model, frozen; eval mode turns its dropout (if any) off. With
    # LoRA it is the policy itself with its adapters switched off: no second copy of the weights
    reference = (lora.base_view(model) if cfg.lora_rank else
                 trainer.build_model(cfg, tokenizer_path, dist.device).eval().requires_grad_(False))
    block_size = model.config.block_size
    loader, val_loader = DPOLoader.splits(cfg.data, cfg.batch_size, cfg.seed, max_len=block_size)
    has_val = val_loader is not None
    cfg.max_steps = cfg.max_steps or loader.steps_for(cfg.epochs, cfg.grad_accum, dist.world_size)
    # the policy's forward and backward, plus the reference's forward (a third of that) when it runs;
    # the optimizer holds the policy's parameters only: the reference is not a submodule of model
    flops = model.flops_per_token(block_size) * (1 if cfg.precompute_ref else 4 / 3)
    run = trainer.start_run(cfg, model, dist, tokenizer_path, flops_per_token=flops)
    for line in loader.describe(cfg.max_steps, cfg.grad_accum, dist.world_size):
        run.logger.print(line)
    if not has_val:
        run.logger.print("the val split is empty: no validation metrics (prepare with a larger --val_fraction)")
    tables = {}
    if cfg.precompute_ref:
        tables["train"] = precompute_reference(reference, cfg.data, "train", block_size, cfg.batch_size, run.ctx, dist)
        if has_val:
            tables["val"] = precompute_reference(reference, cfg.data, "val", block_size, cfg.batch_size, run.ctx, dist)
        reference = None  # only its log-probs are needed from here on
        if dist.device.type == "cuda":
            torch.cuda.empty_cache()

    def get_batch(split_loader: DPOLoader, split: str, pos: int) -> tuple[torch.Tensor, ...]:
        """(x, y, answer_mask, ref_logps) of the batch at a global position, on the device; ref_logps
        (2B,) comes from the precomputed table, or is None: the reference will score the batch itself."""
        x, y, mask = (trainer.to_device(t, dist.device) for t in split_loader.get_batch(pos))
        ref = None
        if split in tables:
            ref = tables[split][split_loader.example_ids(pos)]
            ref = torch.cat([ref[:, 0], ref[:, 1]])  # the loader's row order: all chosen, then all rejected
        return x, y, mask, ref

    def get_step(step: int) -> list[tuple[torch.Tensor, ...]]:
        return [get_batch(loader, "train", position(step, micro_step, dist.rank, dist.world_size, cfg.grad_accum))
                for micro_step in range(cfg.grad_accum)]

    def reference_logps(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
        if ref is not None:
            return ref
        with torch.no_grad():
            return answer_logps(reference, x, y, mask)

    def evaluate() -> dict:
        """DPO loss, reward accuracy and margin on the val split's first eval_batches batches."""
        sums = torch.zeros(4, dtype=torch.float64, device=dist.device)
        for pos in range(dist.rank, min(cfg.eval_batches, val_loader.n_batches), dist.world_size):
            x, y, mask, ref = get_batch(val_loader, "val", pos)
            pc, pr = answer_logps(model, x, y, mask).chunk(2)
            rc, rr = reference_logps(x, y, mask, ref).chunk(2)
            losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.label_smoothing)
            sums += torch.stack([losses.sum(), (chosen > rejected).float().sum(), (chosen - rejected).sum(),
                                 torch.ones_like(losses).sum()]).double()
        if dist.ddp:
            torch_dist.all_reduce(sums)
        loss, acc, margin, n = sums.tolist()
        return {"val_loss": loss / n, "val_reward_acc": acc / n, "val_margin": margin / n}

    if run.start_step == 0 and has_val:
        trainer.evaluate(run, 0, evaluate)  # the start: the policy equals the reference, loss ln 2
    step, batches = run.start_step, get_step(run.start_step)
    while step < cfg.max_steps:
        lr = trainer.set_lr(run.optimizer, trainer.lr_at(step, cfg))
        sums = torch.zeros(len(STEP_STATS), device=dist.device)  # means over the step's micro-batches
        positions = 0
        for micro_step, (x, y, mask, ref) in enumerate(batches):
            last = micro_step == cfg.grad_accum - 1
            with trainer.grad_sync(run, last):
                with run.ctx:
                    rc, rr = reference_logps(x, y, mask, ref).chunk(2)
                    pc, pr = answer_logps(run.model, x, y, mask).chunk(2)  # chosen and rejected in one forward
                    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.label_smoothing)
                    loss = losses.mean() / cfg.grad_accum
                if last:  # fetch the next step's batches while the device works on this one
                    next_batches = get_step(step + 1)
                run.scaler.scale(loss).backward()
            positions += x.numel() * dist.world_size
            sums += torch.stack([losses.mean(), (chosen > rejected).float().mean(), chosen.mean(), rejected.mean(),
                                 (chosen - rejected).mean(), pc.mean(), pr.mean()]).detach() / cfg.grad_accum
        batches = next_batches
        stats = trainer.step_tail(run, step, **dict(zip(STEP_STATS, sums)))
        step += 1
        if trainer.after_step(run, step, stats, lr, positions, evaluate if has_val else None):
            break
    trainer.end_run(run, step, "DPO", f" = {loader.epochs_at(step, cfg.grad_accum, dist.world_size):.2f} epochs of {len(loader.lengths):,} pairs: "
                    f"loss {stats['loss']:.4f}, reward accuracy {stats['reward_acc']:.3f}"
                    if step > run.start_step else "")


def main() -> None:
    trainer.run(DPOConfig, train, sys.argv[1:])


if __name__ == "__main__":
    main()
