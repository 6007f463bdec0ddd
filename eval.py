"""Evaluate a model directory: held-out bits per character, chat answers, multiple choice.

    python eval.py --model out/pretrain/latest --text data/corpus/heldout.parquet
    python eval.py --model out/sft/latest --chat_prompts prompts.jsonl --out answers.jsonl
    python eval.py --model out/sft/latest --mc questions.jsonl
    python eval.py --model out/triples/latest --task data/tasks/kdconv_triples/test.jsonl --metric triples_f1 --out answers.jsonl
    python eval.py --model out/pretrain/latest --ceval ceval-exam --raw --shots 5
    python eval.py --model out/sft/latest --cmmlu cmmlu --subjects agronomy,anatomy

Each mode prints one JSON object on stdout (progress bars go to stderr).

--text FILE (txt / jsonl `text` / parquet `text`): every document is scored from its first token,
after an eos as in pretraining (where each document follows a </s>), in windows of the model's
context (see nll_of_tokens). Bits per character = total NLL / ln 2 / characters: the characters
do not depend on the tokenizer, so models with different tokenizers compare fairly.

--chat_prompts FILE.jsonl --out ANSWERS.jsonl: answers every "prompt" with the chat template, greedy
unless --temperature > 0, prompts of equal token length batched together; each output line is
the input record plus "answer", "tokens" and "finish" ("stop" or "length").

--mc FILE.jsonl (fields "question", "choices" as a list or a {"A": ...} object, "answer" as a
letter): the model picks the choice with the highest log-likelihood as the assistant's answer to
the question (chat template; --raw scores it as plain text after the question). The likelihood is
divided by the choice's length in characters ("accuracy"): a summed log-likelihood prefers short
choices merely for having fewer tokens, and characters, unlike tokens, are the same for every
tokenizer. The unnormalised accuracy is printed too.

--ceval DIR / --cmmlu DIR: the benchmarks as their official archives unzip (benchmarks.py reads
them; --split, --subjects, --shots K solved dev examples of the same subject), in
lm-evaluation-harness's prompt, scored two ways (SCORINGS): the letter after "答案：" and the
option's text per character. Accuracy per subject, per category and overall, with the question
count and the chance level, as a table on stderr and JSON on stdout; --out writes the letter
scoring's predictions as C-Eval's submission JSON (needed for C-Eval test, which has no answers).

--task FILE.jsonl --metric exact_match|triples_f1 [--out ANSWERS.jsonl]: answers every "prompt" as
--chat_prompts does (greedy by default), then scores them against the gold "response" (or
"triples"): the metric's JSON on stdout, each answer with its own counts in --out (tasks.py).

nll_of_tokens() is also what training uses for its validation loss, so the numbers agree.
"""

import argparse
import contextlib
import json
import math
import string
import sys
import time
import unicodedata
from collections.abc import Iterable, Iterator

import torch
from tqdm import tqdm

import benchmarks
import tasks
from data.sources import iter_pretrain
from errors import NanozhError, exit_on_user_error, user_error
from files import read_jsonl, read_prompts, write_jsonl, write_text_atomic
from model import Transformer, autocast, check_fits, load, pick_device, pick_dtype
from tokenizer.tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# scoring: negative log-likelihood of tokens, in windows of the model's context


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
    L = min(context, len(tokens) - 1)
    for start, first in _windows(len(tokens), context, stride):
        x = tokens[start : start + L]
        y = tokens[start + 1 : start + L + 1].clone()
        y[: first - start - 1] = -1
        yield x, y


def _batched(items: Iterable, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _nll_per_row(model, batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and scored-token count of each (inputs, targets) row, rows right-padded to one
    length (causal attention never lets a real position see the padding after it)."""
    device = next(model.parameters()).device
    T = max(len(x) for x, _ in batch)
    x = torch.zeros(len(batch), T, dtype=torch.long)
    y = torch.full((len(batch), T), -1, dtype=torch.long)
    for i, (xi, yi) in enumerate(batch):
        x[i, : len(xi)], y[i, : len(yi)] = xi, yi
    x, y = x.to(device), y.to(device)
    _, nll = model(x, y, reduction="none")  # (B, T) fp32, 0 where y == -1
    return nll.sum(dim=1).double().cpu(), (y != -1).sum(dim=1).cpu()


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def nll_of_tokens(model: torch.nn.Module, tokens: torch.Tensor, context: int, stride: int,
                  batch_size: int = 8) -> tuple[float, int]:
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


def _nll_of_rows(model, rows: Iterable[tuple[torch.Tensor, torch.Tensor]], batch_size: int) -> tuple[float, int]:
    nll, count = 0.0, 0
    with _eval_mode(model):
        for batch in _batched(rows, batch_size):
            row_nll, row_count = _nll_per_row(model, batch)
            nll, count = nll + row_nll.sum().item(), count + int(row_count.sum())
    return nll, count


# -----------------------------------------------------------------------------
# --text: bits per character


def bpc_of_text(model: Transformer, tok: Tokenizer, paths: list[str], stride: int | None = None,
                batch_size: int = 8) -> dict:
    """NLL, token and character counts and bits per character over every document in `paths`,
    each scored as [eos] + its tokens (the eos is context only) with windows of the model's context
    starting every `stride` tokens (default half the context)."""
    context = model.config.block_size
    stride = stride or max(1, context // 2)
    counts = {"docs": 0, "chars": 0, "tokens": 0}

    def rows() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _, text in tqdm(iter_pretrain(paths), desc="scoring", unit="doc", file=sys.stderr):
            ids = torch.tensor([tok.eos_id] + tok.encode(text))
            counts["docs"] += 1
            counts["chars"] += len(text)
            counts["tokens"] += len(ids) - 1
            yield from _window_rows(ids, context, stride)

    t0 = time.perf_counter()
    nll, scored = _nll_of_rows(model, rows(), batch_size)
    seconds = max(time.perf_counter() - t0, 1e-9)
    if counts["chars"] == 0:
        raise user_error(paths[0], "no text to score", "pass a file with non-empty documents")
    chars, tokens = counts["chars"], max(scored, 1)
    return {"bpc": nll / math.log(2) / chars, "nll": nll, "chars": chars, "tokens": scored, "docs": counts["docs"],
            "nll_per_token": nll / tokens, "chars_per_token": chars / tokens, "context": context, "stride": stride,
            "seconds": round(seconds, 2), "tokens_per_s": round(scored / seconds, 1)}


# -----------------------------------------------------------------------------
# --chat_prompts: answers for a file of prompts


def answer_prompts(model: Transformer, tok: Tokenizer, records: list[tuple[str, dict]], max_new_tokens: int = 256,
                   temperature: float = 0.0, batch_size: int = 8, raw: bool = False, seed: int = 1337) -> list[dict]:
    """Each (where, record) answered: the record plus "answer", "tokens" and "finish", in input
    order. Prompts of equal token length run as one batch (no padding to get wrong); a batch runs
    until every row has stopped, rows that stopped early just wait."""
    device = next(model.parameters()).device
    stop_ids = [tok.im_end_id, tok.eos_id]
    generator = torch.Generator(device=device).manual_seed(seed)
    prompts = []
    for where, r in records:
        prompts.append(tok.prompt_ids(r["prompt"] if raw else [{"role": "user", "content": r["prompt"]}], raw))
        check_fits(prompts[-1], model, where)
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    groups = [g[j : j + batch_size] for g in by_length.values() for j in range(0, len(g), batch_size)]
    out: list[dict] = [{} for _ in records]
    with _eval_mode(model), tqdm(total=len(records), desc="answering", unit="prompt", file=sys.stderr) as bar:
        for group in groups:
            idx = torch.tensor([prompts[i] for i in group], device=device)
            new = list(model.generate_stream(idx, max_new_tokens, temperature=temperature, stop_ids=stop_ids,
                                             generator=generator))
            rows = torch.stack(new, dim=1).tolist() if new else [[] for _ in group]
            for i, row in zip(group, rows):
                stop = next((k for k, t in enumerate(row) if t in stop_ids), None)
                answer = row if stop is None else row[:stop]
                out[i] = {**records[i][1], "answer": tok.decode(answer), "tokens": len(answer),
                          "finish": "length" if stop is None else "stop"}
            bar.update(len(group))
    return out


# -----------------------------------------------------------------------------
# --mc: multiple choice by log-likelihood


def read_mc(path: str) -> list[tuple[int, str, list[str], int]]:
    """(line, question, choices, index of the answer) per JSONL line; any problem is a file:line error."""
    items = []
    for n, rec in read_jsonl(path):
        if not isinstance(rec, dict) or not {"question", "choices", "answer"} <= rec.keys():
            have = ", ".join(rec) if isinstance(rec, dict) else type(rec).__name__
            raise user_error(path, f"needs fields question, choices, answer (has: {have})", line=n)
        choices, letters = rec["choices"], ""
        if isinstance(choices, dict):  # {"A": ..., "B": ...}: the keys are the letters
            letters = "".join(sorted(choices)) if all(len(k) == 1 and k.isupper() for k in choices) else ""
            choices = [choices[k] for k in sorted(choices)]
        elif isinstance(choices, list):
            letters = string.ascii_uppercase[: len(choices)]
        if not isinstance(rec["question"], str) or len(letters) < 2 or \
                not all(isinstance(c, str) and c for c in choices):
            raise user_error(path, "question must be a string and choices at least two non-empty strings", line=n)
        answer = rec["answer"]
        # one of the letters, not a substring of them: "" and "BC" are in "ABCD" too
        if not isinstance(answer, str) or answer.strip().upper() not in list(letters):
            raise user_error(path, f"answer {answer!r} is not one of the letters {letters}",
                             "one letter, such as \"A\"", line=n)
        items.append((n, rec["question"], choices, letters.index(answer.strip().upper())))
    if not items:
        raise user_error(path, "no questions in file", "one JSON object per line")
    return items


def continuation_nll(model: Transformer, tok: Tokenizer, prompts: list[tuple[str, list[str]]], raw: bool = False,
                     batch_size: int = 8) -> list[list[float]]:
    """Summed NLL of each continuation after its prompt, one list per prompt: the prompt as the
    user's message and the continuation as the assistant's answer (chat template), or with raw as
    plain text after an eos. A context longer than the model's is cut from the left (the start of
    the prompt goes first; the continuation is always kept)."""
    ctx = model.config.block_size
    rows = []
    for text, continuations in prompts:
        head = [tok.eos_id] + tok.encode(text) if raw else \
            tok.render_chat([{"role": "user", "content": text}], add_generation_prompt=True)[0]
        for continuation in continuations:
            tail = tok.encode(continuation)
            ids = torch.tensor((head + tail)[-(ctx + 1):])
            y = ids[1:].clone()
            y[: max(0, len(y) - len(tail))] = -1
            rows.append((ids[:-1], y))
    # batches of similar lengths waste less on padding; scores go back to their rows after
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    nll = [0.0] * len(rows)
    with _eval_mode(model):
        for batch in tqdm(list(_batched(order, batch_size)), desc="choices", unit="batch", file=sys.stderr):
            for i, score in zip(batch, _nll_per_row(model, [rows[i] for i in batch])[0].tolist()):
                nll[i] = score
    out, k = [], 0
    for _, continuations in prompts:
        out.append(nll[k : k + len(continuations)])
        k += len(continuations)
    return out


def mc_accuracy(model: Transformer, tok: Tokenizer, items: list[tuple[int, str, list[str], int]], raw: bool = False,
                batch_size: int = 8) -> dict:
    """Accuracy when the model picks the choice it finds most likely after the question, per
    character ("accuracy") and summed ("accuracy_unnormalised"), scored by continuation_nll."""
    t0 = time.perf_counter()
    nlls = continuation_nll(model, tok, [(question, choices) for _, question, choices, _ in items], raw, batch_size)
    right_norm = right_sum = 0
    for (_, _, choices, answer), nll in zip(items, nlls):
        right_norm += min(range(len(choices)), key=lambda i: nll[i] / len(choices[i])) == answer
        right_sum += min(range(len(choices)), key=lambda i: nll[i]) == answer
    return {"accuracy": right_norm / len(items), "accuracy_unnormalised": right_sum / len(items),
            "questions": len(items), "template": "raw" if raw else "chat",
            "seconds": round(time.perf_counter() - t0, 2)}


# -----------------------------------------------------------------------------
# --ceval / --cmmlu: the Chinese benchmarks in their official CSV layouts (benchmarks.py reads them)

SCORINGS = {  # both are reported: a base model that never saw the letter format does better on "text"
    "letter": "log-likelihood of the answer letter after 答案： (lm-evaluation-harness's acc)",
    "text": "log-likelihood per character of the option's own text",
}


def benchmark_picks(model: Transformer, tok: Tokenizer, benchmark: str, questions: list[benchmarks.Question],
                    dev: dict[str, list[benchmarks.Question]], raw: bool = False, batch_size: int = 8
                    ) -> dict[str, list[int]]:
    """The option each scoring of SCORINGS picks for each question, after the solved dev examples
    of its subject in `dev` (none where `dev` has no entry: zero-shot)."""
    picks = {}
    for scoring in SCORINGS:
        by_text = scoring == "text"
        prompts = [benchmarks.prompt(benchmark, q, dev.get(q.subject, []), by_text) for q in questions]
        nlls = continuation_nll(model, tok, prompts, raw, batch_size)
        picks[scoring] = [min(range(len(options)), key=lambda i: nll[i] / (len(options[i]) if by_text else 1))
                          for (_, options), nll in zip(prompts, nlls)]
    return picks


def benchmark_report(benchmark: str, questions: list[benchmarks.Question], picks: dict[str, list[int]]) -> dict:
    """Accuracy of each scoring overall, per category and per subject, each with its question count
    and chance level (1 / options, averaged)."""
    def tally(idx: list[int]) -> dict:
        out = {"questions": len(idx), "chance": sum(1 / len(questions[i].choices) for i in idx) / len(idx)}
        return {**out, **{s: sum(p[i] == questions[i].answer for i in idx) / len(idx) for s, p in picks.items()}}

    by_subject: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        by_subject.setdefault(q.subject, []).append(i)
    category = {s: benchmarks.subject_info(benchmark, s)[1] for s in by_subject}
    return {**tally(list(range(len(questions)))),
            "categories": {c: tally([i for s, idx in by_subject.items() if category[s] == c for i in idx])
                           for c in benchmarks.CATEGORIES if c in category.values()},
            "subjects": {s: {"category": category[s], **tally(idx)} for s, idx in sorted(by_subject.items())}}


def _pad(text: str, width: int) -> str:
    """Left-justify for a terminal, where a CJK character is two columns wide."""
    return text + " " * max(0, width - sum(1 + (unicodedata.east_asian_width(c) in "WF") for c in text))


def print_benchmark_table(report: dict) -> None:
    """Subjects, then categories, then the total, one row each, on stderr."""
    head = f"{'questions':>9} {'chance':>7} " + " ".join(f"{s:>7}" for s in SCORINGS)

    def row(name: str, category: str, r: dict) -> str:
        return (_pad(name, 42) + _pad(category, 10) + f"{r['questions']:>9} {r['chance']:>7.3f} "
                + " ".join(f"{r[s]:>7.3f}" for s in SCORINGS))
    lines = [_pad("subject", 42) + _pad("category", 10) + head]
    lines += [row(s, r["category"], r) for s, r in report["subjects"].items()]
    lines += [row("", c, r) for c, r in report["categories"].items()]
    lines.append(row("overall", "", report))
    print("\n".join(lines), file=sys.stderr)


def submission(questions: list[benchmarks.Question], picks: list[int]) -> dict[str, dict[str, str]]:
    """Predictions in C-Eval's submission JSON: {subject: {question id: letter}}."""
    out: dict[str, dict[str, str]] = {}
    for q, p in zip(questions, picks):
        out.setdefault(q.subject, {})[q.id] = benchmarks.LETTERS[p]
    return out


def run_benchmark(model: Transformer, tok: Tokenizer, args: argparse.Namespace) -> dict:
    """--ceval / --cmmlu: the table on stderr, the result for stdout; predictions to --out if given.
    A split without answers (C-Eval test) gets predictions only, so it needs --out."""
    name, root = ("ceval", args.ceval) if args.ceval else ("cmmlu", args.cmmlu)
    split = args.split or benchmarks.BENCHMARKS[name][2]
    questions, dev = benchmarks.read_benchmark(name, root, split, benchmarks.parse_subjects(args.subjects), args.shots)
    answered = all(q.answer is not None for q in questions)
    if not answered and not args.out:
        raise user_error(f"{root}/{split}", "has no answers to score against",
                         "pass --out submission.json for C-Eval's submission file")
    t0 = time.perf_counter()
    picks = benchmark_picks(model, tok, name, questions, dev, args.raw, args.batch_size)
    result = {"benchmark": name, "split": split, "shots": args.shots, "template": "raw" if args.raw else "chat",
              "scorings": SCORINGS}
    if answered:
        report = benchmark_report(name, questions, picks)
        print_benchmark_table(report)
        result.update(report)
    else:
        result["questions"] = len(questions)
    if args.out:  # the letter scoring's picks: what leaderboards report
        write_text_atomic(args.out, json.dumps(submission(questions, picks["letter"]), ensure_ascii=False, indent=1))
        result["predictions"] = args.out
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


# -----------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model directory (e.g. OUT_DIR/latest)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--text", nargs="+", help="txt / jsonl / parquet files or directories of documents")
    mode.add_argument("--chat_prompts", help="JSONL with a \"prompt\" field per line (needs --out)")
    mode.add_argument("--mc", help="JSONL with question, choices, answer (a letter)")
    mode.add_argument("--task", help="JSONL with prompt and gold response: answers scored by --metric (--out: the answers)")
    p.add_argument("--metric", choices=tasks.METRICS, default="exact_match", help="--task's metric")
    mode.add_argument("--ceval", metavar="DIR", help="C-Eval as unzipped: dev/ val/ test/ of <subject>_<split>.csv")
    mode.add_argument("--cmmlu", metavar="DIR", help="CMMLU as unzipped: dev/ test/ of <subject>.csv")
    p.add_argument("--out", help="where --chat_prompts writes its answers (JSONL); --ceval/--cmmlu their "
                                 "predictions (C-Eval's submission JSON)")
    p.add_argument("--split", help="--ceval/--cmmlu split to score (default: C-Eval val, CMMLU test)")
    p.add_argument("--shots", type=int, default=0, choices=range(6), help="solved dev examples before each question")
    p.add_argument("--subjects", default="", help="--ceval/--cmmlu: comma-separated subjects (default: all)")
    p.add_argument("--stride", type=int, default=0, help="--text window stride in tokens (default: half the context)")
    p.add_argument("--raw", action="store_true",
                   help="--chat_prompts / --mc / --ceval / --cmmlu as plain text, no chat template (base models)")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype; auto = bfloat16 autocast on CUDA, float32 elsewhere")
    args = p.parse_args()
    if args.chat_prompts and not args.out:
        p.error("--chat_prompts needs --out ANSWERS.jsonl")
    try:
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        model, tok = load(args.model, device)
        if not 1 <= (args.stride or 1) <= model.config.block_size:
            raise user_error("--stride", f"{args.stride} is outside 1..{model.config.block_size}",
                             "0 = half the context")
        with autocast(device, dtype):  # fp32 weights, matmuls in dtype: as training's validation loss
            if args.text:
                result = bpc_of_text(model, tok, args.text, args.stride or None, args.batch_size)
            elif args.task:
                records = tasks.read_task(args.task, args.metric)
                answers = answer_prompts(model, tok, records, args.max_new_tokens, args.temperature,
                                         args.batch_size, args.raw, args.seed)
                result, per_example = tasks.score(args.metric, [r for _, r in records], [a["answer"] for a in answers])
                if args.out:
                    write_jsonl(args.out, [{**a, **e} for a, e in zip(answers, per_example)])
                result = {"task": args.task, "metric": args.metric, **result}
            elif args.chat_prompts:
                records = [(f"{args.chat_prompts}:{n}", rec) for n, rec in read_prompts(args.chat_prompts)]
                t0 = time.perf_counter()
                answers = answer_prompts(model, tok, records, args.max_new_tokens, args.temperature,
                                         args.batch_size, args.raw, args.seed)
                seconds = time.perf_counter() - t0
                write_jsonl(args.out, answers)
                tokens = sum(a["tokens"] for a in answers)
                result = {"prompts": len(answers), "tokens": tokens, "seconds": round(seconds, 2),
                          "tokens_per_s": round(tokens / max(seconds, 1e-9), 1), "out": args.out}
            elif args.mc:
                result = mc_accuracy(model, tok, read_mc(args.mc), args.raw, args.batch_size)
            else:
                result = run_benchmark(model, tok, args)
    except NanozhError as e:
        exit_on_user_error(e)
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
