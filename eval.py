"""Evaluate a model directory: held-out bits per character, chat answers, multiple choice.

    python eval.py --model out/pretrain/latest --text data/corpus/heldout.parquet
    python eval.py --model out/sft/latest --chat_prompts prompts.jsonl --out answers.jsonl
    python eval.py --model out/sft/latest --mc questions.jsonl

nll_of_tokens() below is also what training uses for its validation loss, so the two numbers are
computed the same way.
"""

from collections.abc import Iterable, Iterator

import torch

# -----------------------------------------------------------------------------
# scoring: total negative log-likelihood of tokens, in windows of the model's context


def _windows(n: int, context: int, stride: int) -> list[tuple[int, int]]:
    """Sliding windows over a sequence of n tokens, as (start, first) pairs.

    Each window has the same length L = min(context, n - 1): it feeds tokens[start : start + L] and
    predicts tokens[start + 1 : start + L + 1]. Windows start every `stride` tokens, so every token
    after the first window is predicted from at least L - stride earlier tokens; only targets at
    positions >= first count, the earlier ones were scored by a previous window. The last window is
    moved back to end exactly at the last token, so it is as full as the others.
    """
    L = min(context, n - 1)
    windows, done, s = [], 0, 0  # tokens 1..done are scored
    while done < n - 1:
        end = min(s + L, n - 1)  # position of the window's last target
        windows.append((end - L, done + 1))
        done, s = end, s + stride
    return windows


def _window_rows(tokens: torch.Tensor, context: int, stride: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) per window of a 1-D token tensor, targets -1 where not scored."""
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in 1..context, got stride={stride} context={context}")
    for start, first in _windows(len(tokens), context, stride):
        L = min(context, len(tokens) - 1)
        x = tokens[start : start + L]
        y = tokens[start + 1 : start + L + 1].clone()
        y[: first - start - 1] = -1
        yield x, y


@torch.no_grad()
def _nll_of_rows(model, rows: Iterable[tuple[torch.Tensor, torch.Tensor]], batch_size: int) -> tuple[float, int]:
    """Sum of -log p(target) over (inputs, targets) rows, batched with right padding (causal
    attention never lets a real position see the padding after it). Targets -1 are ignored."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for batch in _batched(rows, batch_size):
            batch_nll, batch_count = _nll_of_batch(model, batch, device)
            nll, count = nll + batch_nll, count + batch_count
    finally:
        model.train(was_training)
    return nll, count


def _batched(items: Iterable, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _nll_of_batch(model, batch: list[tuple[torch.Tensor, torch.Tensor]], device) -> tuple[float, int]:
    T = max(len(x) for x, _ in batch)
    x = torch.zeros(len(batch), T, dtype=torch.long)
    y = torch.full((len(batch), T), -1, dtype=torch.long)
    for i, (xi, yi) in enumerate(batch):
        x[i, : len(xi)], y[i, : len(yi)] = xi, yi
    x, y = x.to(device), y.to(device)
    _, nll = model(x, y, reduction="none")  # (B, T) fp32, 0 where y == -1
    # summed in fp32 per batch, accumulated in Python floats (fp64) across batches
    return nll.sum().item(), int((y != -1).sum())


def nll_of_tokens(model, tokens: torch.Tensor, context: int, stride: int, batch_size: int = 8) -> tuple[float, int]:
    """Total negative log-likelihood (nats) of a 1-D token tensor and the number of tokens scored.

    Every token t >= 1 is scored once, predicted from up to `context` previous tokens (token 0 is
    only context: put eos first, as pretraining does, to score a document from its start). Windows
    of `context` tokens start every `stride` tokens (1 <= stride <= context); in each window only
    the positions no earlier window scored count, so with stride < context every later token still
    sees at least context - stride tokens of history. stride == context is fastest (no overlap) but
    the first tokens of each window see little history; context // 2 is a good compromise.
    Windows go through the model in batches of batch_size, without grad and in eval mode (the
    model's previous mode is restored). Mean loss per token = nll / count.
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten().cpu()
    if len(tokens) < 2:
        return 0.0, 0
    return _nll_of_rows(model, _window_rows(tokens, context, stride), batch_size)
