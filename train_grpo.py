"""Reinforcement learning with verifiable rewards (GRPO): a chat model answers, a program checks.

    python train_grpo.py --init_from out/sft/latest --task arithmetic --out_dir out/grpo
    python train_grpo.py --init_from out/sft/latest --task my_problems.jsonl --out_dir out/grpo --kl_coef=0.04
    torchrun --standalone --nproc_per_node=8 train_grpo.py --init_from out/sft/latest --task arithmetic --out_dir DIR
    python train_grpo.py --init_from out/sft/latest --task arithmetic --out_dir out/grpo --resume

--task arithmetic is a built-in, endless supply of Chinese word problems with integer answers
("小明有3个苹果，又买了4个。小明现在一共有多少个苹果？"); --task_ops picks the operations (+ - *) and
--task_max the largest operand. Problem i is a pure function of (seed, i). --task FILE.jsonl takes
your own problems, one {"prompt": "...", "answer": 42} per line (the answer a number or a numeric
string); a fixed draw of eval_prompts of them is held out. Settings, checkpoints, resume,
Ctrl-C/SIGTERM, logging and torchrun work as in train_pretrain.py; OUT_DIR/latest is a chat model
directory for sample.py --chat, eval.py and the next --init_from.

One step (Shao et al., 2024, DeepSeekMath's GRPO):
1. sample: each prompt is answered group_size times at `temperature` (model.generate_stream, with
   the KV cache, the group as one batch), until <|im_end|> or max_new_tokens.
2. reward: `reward` below, 1 when the last number of the answer equals the gold one, else 0, plus
   format_weight when the answer ends in "答案：N". The advantage of each answer is its reward
   relative to its group, (r - mean) / (std + eps): better than its siblings is pushed up, worse is
   pushed down, and no value network is needed. A group whose answers all got the same reward (all
   right or all wrong) has advantage 0 everywhere and teaches nothing: logged as `zero_signal`.
3. update, ppo_epochs times over the same answers: the clipped ratio objective of PPO per answer
   token, ratio = pi(token) / pi_old(token) with pi_old the policy that sampled,
       loss_t = -min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps) * A) + kl_coef * k3_t
   where k3 = exp(ref - logp) - (ref - logp) - 1 is Schulman's unbiased, always positive estimator of
   KL(pi || ref) against the frozen --init_from model (kl_coef 0: no reference is kept at all). The
   loss is one mean over every answer token of the step on all ranks (prompt and padding are
   masked), so grad_accum=2 on one rank and two ranks compute the same gradient. The first epoch is
   on-policy: pi_old is the current model, its log-probs are this forward's own, detached (ratio
   exactly 1, nothing clipped, and no extra forward pass); later epochs reuse them.

Log-probs are the model's own (temperature 1), whatever temperature sampled: the temperature only
shapes exploration. A step's rollouts are a pure function of (seed, prompt index) and the weights:
each prompt's group draws from its own torch.Generator, seeded from the prompt's global index (a
function of step, micro-step, rank and world size, as every loader's batches are), so --resume
repeats an uninterrupted run bit for bit on CPU and two ranks sample what one rank with
--grad_accum=2 does.

Logged per step: reward (mean reward), acc (share of answers whose last number is right), zero_signal
(share of groups with no signal), kl (mean k3 per answer token; 0 without a reference), clip_frac
(share of answer tokens whose clipped term was the smaller, so they had no gradient), answer_len
(mean answer tokens), sample_s and train_s (seconds this step spent sampling and updating); kl,
clip_frac and loss are of the last PPO epoch. Every eval_every steps the held-out prompts are
answered greedily: val_acc, val_reward.
"""

import math
import random
import re
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
import torch.distributed as torch_dist

import trainer
from data.loaders import position
from errors import user_error
from files import read_jsonl
from model import Transformer, check_fits
from tokenizer.tokenizer import Tokenizer


@dataclass
class GRPOConfig(trainer.TrainConfig):
    out_dir: str = "out/grpo"
    task: str = "arithmetic"      # "arithmetic" (built in) or a JSONL file of {"prompt", "answer"}
    task_ops: str = "+-"          # arithmetic: the operations to draw from, any of + - *
    task_max: int = 20            # arithmetic: operands are 1..task_max
    eval_prompts: int = 64        # held-out prompts scored greedily at each evaluation
    max_steps: int = 200
    batch_size: int = 4           # prompts per micro-step on each rank (x group_size answers)
    group_size: int = 8           # answers sampled per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0
    ppo_epochs: int = 1           # updates on each step's answers; 1 = purely on-policy
    clip_eps: float = 0.2
    kl_coef: float = 0.0          # weight of the KL to the --init_from model; 0 = no reference at all
    format_weight: float = 0.0    # reward for ending the answer with "答案：N"
    adv_eps: float = 1e-4         # in (r - mean) / (std + adv_eps)
    lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_steps: int = 10
    weight_decay: float = 0.0
    log_every: int = 5
    eval_every: int = 25
    save_every: int = 50


# what each step logs besides grad_norm, lr and speed
STEP_STATS = ("loss", "reward", "acc", "zero_signal", "kl", "clip_frac", "answer_len", "sample_s", "train_s")

# -----------------------------------------------------------------------------
# rewards a program can check

NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
FORMAT = re.compile(r"答案[是：:]\s*-?\d[\d,.]*\s*[。.]?\s*$")


def last_number(text: str) -> float | None:
    """The last number written in `text` (thousands separators allowed), or None if there is none."""
    found = NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def parse_number(value) -> float | None:
    """A gold answer: a JSON number, or a string that is one number ("42", "-3.5", "1,000"); else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(str(value).replace(",", ""))
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def reward(answer: str, gold: float, format_weight: float = 0.0) -> tuple[float, bool]:
    """(reward, correct): correct when the last number in the answer equals the gold one, worth 1;
    format_weight more when the answer ends with "答案：N" (or "答案是N"), the form a user can parse."""
    correct = last_number(answer) == gold
    return float(correct) + format_weight * bool(FORMAT.search(answer)), correct

# -----------------------------------------------------------------------------
# tasks: the j-th training prompt is a pure function of (seed, j); the held-out prompts are fixed


@dataclass
class Task:
    train_item: Callable[[int], tuple[str, float]]   # j -> (prompt, gold answer)
    heldout: list[tuple[str, float]]
    describe: str


NAMES = ["小明", "小红", "小刚", "小丽", "妈妈", "爷爷", "王老师", "小华"]
THINGS = [("个", "苹果"), ("支", "铅笔"), ("本", "书"), ("块", "糖"), ("个", "橘子"), ("张", "邮票"), ("颗", "草莓")]


def arithmetic_problem(seed: int, split: str, index: int, ops: str, max_operand: int) -> tuple[str, float]:
    """A word problem in Chinese with an integer answer: one of `ops` on two operands in 1..max_operand
    (for - the larger comes first, so answers are never negative). A pure function of its arguments."""
    rng = random.Random(f"arithmetic:{seed}:{split}:{index}")
    op, name, (unit, thing) = rng.choice(ops), rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
    if op == "+":
        return f"{name}有{a}{unit}{thing}，又买了{b}{unit}。{name}现在一共有多少{unit}{thing}？", a + b
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"{name}有{a}{unit}{thing}，送给朋友{b}{unit}。{name}还剩多少{unit}{thing}？", a - b
    return f"{name}买了{a}盒{thing}，每盒有{b}{unit}。{name}一共买了多少{unit}{thing}？", a * b


def arithmetic_task(cfg: GRPOConfig) -> Task:
    if not cfg.task_ops or set(cfg.task_ops) - set("+-*"):
        raise user_error("command line", f"--task_ops={cfg.task_ops!r} must use only + - *", "e.g. --task_ops=+-")
    if cfg.task_max < 1:
        raise user_error("command line", f"--task_max={cfg.task_max} must be at least 1")
    # the held-out problems come from their own stream; with few possible problems they share numbers
    heldout = [arithmetic_problem(cfg.seed, "heldout", i, cfg.task_ops, cfg.task_max) for i in range(cfg.eval_prompts)]
    return Task(lambda j: arithmetic_problem(cfg.seed, "train", j, cfg.task_ops, cfg.task_max), heldout,
                f"arithmetic word problems ({' '.join(cfg.task_ops)}, operands 1..{cfg.task_max})")


def jsonl_task(path: str, seed: int, n_heldout: int) -> Task:
    """{"prompt": str, "answer": number} per line; n_heldout of them (a fixed draw, the same for every
    seed) are held out, the rest are visited in a new seeded order each epoch."""
    items = []
    for line, rec in read_jsonl(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            raise user_error(path, 'each line needs a non-empty "prompt" string', '{"prompt": "...", "answer": 42}',
                             line=line)
        gold = parse_number(rec.get("answer"))
        if gold is None:
            raise user_error(path, f'"answer" is {rec.get("answer")!r}, not a number', '{"answer": 42}', line=line)
        items.append((rec["prompt"], gold))
    order = list(range(len(items)))
    random.Random(0).shuffle(order)
    if len(items) <= n_heldout:
        raise user_error(path, f"{len(items)} problems leave none to train on after holding out {n_heldout}",
                         "add problems or lower --eval_prompts")
    heldout, train_items = [items[i] for i in order[:n_heldout]], [items[i] for i in order[n_heldout:]]

    @lru_cache(maxsize=4)
    def epoch_order(epoch: int) -> list[int]:
        perm = list(range(len(train_items)))
        random.Random(f"{seed}:{epoch}").shuffle(perm)
        return perm

    def train_item(j: int) -> tuple[str, float]:
        return train_items[epoch_order(j // len(train_items))[j % len(train_items)]]

    return Task(train_item, heldout, f"{len(train_items):,} problems from {path} ({n_heldout} held out)")

# -----------------------------------------------------------------------------
# the objective


def group_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """(prompts, group_size) rewards -> advantages: each reward relative to its group's mean, in units
    of the group's (sample) standard deviation. A group of equal rewards gets 0 everywhere."""
    mean, std = rewards.mean(dim=1, keepdim=True), rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float, kl_coef: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token GRPO loss (rows, T), 0 off the answer tokens, and the per-token k3 KL and clipped
    indicator (detached). logps: the policy's log-prob of each target token; old_logps: the sampling
    policy's, or None on the first epoch (this policy sampled: ratio exactly 1); ref_logps: the
    reference's, or None for no KL term; advantages: one per row."""
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    adv = advantages[:, None]
    unclipped, clipped = ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    loss = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logps)
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + kl_coef * kl
    return loss * mask, kl.detach() * mask, (clipped < unclipped).float() * mask


def token_logps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(rows, T) log-prob of each target token under the model, 0 where y is -1."""
    _, nll = model(x, y, reduction="none")
    return -nll

# -----------------------------------------------------------------------------
# sampling


def sample_group(model: Transformer, prompt: list[int], n: int, max_new_tokens: int, temperature: float,
                 stop_ids: list[int], generator: torch.Generator | None, device: torch.device) -> list[list[int]]:
    """n answers to one prompt, sampled as one batch with the KV cache; each ends with its stop token,
    or is cut at max_new_tokens (or at the end of the context) without one."""
    idx = torch.tensor([prompt] * n, dtype=torch.long, device=device)
    steps = list(model.generate_stream(idx, max_new_tokens, temperature, stop_ids=stop_ids, generator=generator))
    answers = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(n)]
    # after its stop token a finished row repeats it until every row is done: cut there
    return [a[:next((i + 1 for i, t in enumerate(a) if t in stop_ids), len(a))] for a in answers]


def pack(prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) rows of prompt + answer, padded to the longest; y is -1 everywhere but the answer tokens."""
    T = max(len(p) + len(a) for p, a in zip(prompts, answers)) - 1
    x = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    y = torch.full((len(prompts), T), -1, dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        seq = torch.tensor(p + a)
        x[i, :len(seq) - 1] = seq[:-1]
        y[i, len(p) - 1:len(seq) - 1] = seq[len(p):]
    return x, y


def rollout_seed(seed: int, index: int) -> int:
    """The sampling seed of the prompt at global index `index`."""
    return random.Random(f"rollout:{seed}:{index}").getrandbits(63)


def train(cfg: GRPOConfig) -> None:
    if cfg.group_size < 2:
        raise user_error("command line", f"--group_size={cfg.group_size} must be at least 2",
                         "advantages compare the answers within a group; 8 is usual")
    if cfg.ppo_epochs < 1 or cfg.clip_eps <= 0 or cfg.kl_coef < 0 or cfg.temperature <= 0:
        raise user_error("command line", "--ppo_epochs must be >= 1, --clip_eps and --temperature > 0, --kl_coef >= 0")
    task = arithmetic_task(cfg) if cfg.task == "arithmetic" else jsonl_task(cfg.task, cfg.seed, cfg.eval_prompts)
    dist, tokenizer_path, model = trainer.setup(cfg, "grpo")
    tok = Tokenizer(tokenizer_path)
    stop_ids = [tok.im_end_id, tok.eos_id]
    # the KL anchor: the --init_from model, frozen; not built at all when the KL term is off
    reference = None
    if cfg.kl_coef > 0:
        reference = trainer.build_model(cfg, tokenizer_path, dist.device).eval().requires_grad_(False)
    run = trainer.start_run(cfg, model, dist, tokenizer_path)
    run.logger.print(f"task: {task.describe}; {cfg.batch_size * cfg.grad_accum * dist.world_size} prompts x "
                     f"{cfg.group_size} answers per step")

    def encode(prompt: str, where: str) -> list[int]:
        ids = tok.prompt_ids([{"role": "user", "content": prompt}])
        check_fits(ids, model, where)
        return ids

    def rollout(step: int) -> tuple[list, dict[str, torch.Tensor]]:
        """This rank's micro-batches of the step, (x, y, advantages, ref_logps) on the device, and the
        rollout's statistics (means over this rank's answers and groups)."""
        batches, rewards_all, correct_all, lengths = [], [], [], []
        run.raw_model.eval()
        for micro_step in range(cfg.grad_accum):
            first = position(step, micro_step, dist.rank, dist.world_size, cfg.grad_accum) * cfg.batch_size
            prompts, answers, rewards = [], [], []
            for j in range(first, first + cfg.batch_size):
                prompt, gold = task.train_item(j)
                ids = encode(prompt, f"{cfg.task} problem {j}")
                gen = torch.Generator(device=dist.device).manual_seed(rollout_seed(cfg.seed, j))
                with run.ctx:
                    group = sample_group(run.raw_model, ids, cfg.group_size, cfg.max_new_tokens, cfg.temperature,
                                         stop_ids, gen, dist.device)
                scored = [reward(tok.decode(a), gold, cfg.format_weight) for a in group]
                prompts += [ids] * cfg.group_size
                answers += group
                rewards.append([r for r, _ in scored])
                correct_all += [c for _, c in scored]
            x, y = (trainer.to_device(t, dist.device) for t in pack(prompts, answers, tok.pad_id))
            rewards = torch.tensor(rewards)
            ref = None
            if reference is not None:
                with torch.no_grad(), run.ctx:
                    ref = token_logps(reference, x, y)
            batches.append((x, y, group_advantages(rewards, cfg.adv_eps).flatten().to(dist.device), ref))
            rewards_all.append(rewards)
            lengths += [len(a) for a in answers]
        run.raw_model.train()
        rewards = torch.cat(rewards_all)
        zero = (rewards.max(dim=1).values == rewards.min(dim=1).values).float().mean()
        stats = {"reward": rewards.mean(), "acc": torch.tensor(correct_all).float().mean(), "zero_signal": zero,
                 "answer_len": torch.tensor(lengths).float().mean()}
        return batches, {k: v.to(dist.device) for k, v in stats.items()}

    def evaluate() -> dict:
        """Greedy answers to the held-out prompts (ranks take every world_size-th): accuracy, reward."""
        sums = torch.zeros(3, dtype=torch.float64, device=dist.device)
        for i in range(dist.rank, len(task.heldout), dist.world_size):
            prompt, gold = task.heldout[i]
            ids = encode(prompt, f"held-out problem {i}")
            answer = sample_group(model, ids, 1, cfg.max_new_tokens, 0.0, stop_ids, None, dist.device)[0]
            r, correct = reward(tok.decode(answer), gold, cfg.format_weight)
            sums += torch.tensor([float(correct), r, 1.0], dtype=torch.float64, device=dist.device)
        if dist.ddp:
            torch_dist.all_reduce(sums)
        correct, r, n = sums.tolist()
        return {"val_acc": correct / n, "val_reward": r / n}

    has_eval = bool(task.heldout)
    if run.start_step == 0 and has_eval:
        trainer.evaluate(run, 0, evaluate)  # the --init_from model: where the curves start
    step = run.start_step
    while step < cfg.max_steps:
        lr = trainer.set_lr(run.optimizer, trainer.lr_at(step, cfg))
        t0 = time.perf_counter()
        batches, rollout_stats = rollout(step)
        t1 = time.perf_counter()
        # the loss is a mean over the step's answer tokens on all ranks; the world_size factor undoes
        # DDP's averaging of gradients over ranks, as in train_sft.py
        counts = torch.tensor([float((y != -1).sum()) for _, y, _, _ in batches], device=dist.device).sum()
        positions = torch.tensor(float(sum(x.numel() for x, _, _, _ in batches)), device=dist.device)
        if dist.ddp:
            torch_dist.all_reduce(counts)
            torch_dist.all_reduce(positions)
        scale = dist.world_size / counts.clamp(min=1)
        old_logps = [None] * cfg.grad_accum
        for epoch in range(cfg.ppo_epochs):
            sums = torch.zeros(3, device=dist.device)  # loss, kl, clipped: this rank's share of the step's means
            for micro_step, (x, y, adv, ref) in enumerate(batches):
                last = micro_step == cfg.grad_accum - 1
                with trainer.grad_sync(run, last):
                    with run.ctx:
                        logps = token_logps(run.model, x, y)
                        losses, kl, clipped = grpo_loss(logps, old_logps[micro_step], ref, adv, (y != -1).float(),
                                                        cfg.clip_eps, cfg.kl_coef)
                        loss = losses.sum() * scale
                    run.scaler.scale(loss).backward()
                if epoch == 0:  # the sampling policy's log-probs, for the later epochs' ratios
                    old_logps[micro_step] = logps.detach()
                sums += torch.stack([loss.detach(), kl.sum() * scale, clipped.sum() * scale])
            seconds = torch.tensor([t1 - t0, time.perf_counter() - t1], device=dist.device)
            stats = trainer.step_tail(run, step, loss=sums[0], kl=sums[1], clip_frac=sums[2], **rollout_stats,
                                      sample_s=seconds[0], train_s=seconds[1])
        step += 1
        # the log line in a fixed order, then what the trainer adds (an MoE's router stats)
        stats = {**{k: stats[k] for k in (*STEP_STATS, "grad_norm")}, **stats}
        if trainer.after_step(run, step, stats, lr, int(positions.item()) * cfg.ppo_epochs,
                              evaluate if has_eval else None):
            break
    trainer.end_run(run, step, "GRPO", f": reward {stats['reward']:.3f}, accuracy {stats['acc']:.3f}"
                    if step > run.start_step else "")


def main() -> None:
    trainer.run(GRPOConfig, train, sys.argv[1:])


if __name__ == "__main__":
    main()
