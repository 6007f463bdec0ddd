"""The report of a quick-start run: prints its summary table and writes OUT/report.md.

    python report.py out/quickstart
    python report.py out/quickstart --model out/quickstart/sft/latest

OUT is a quickstart.sh output directory: OUT/times/<stage> (seconds), OUT/bpc/<stage> (held-out
bits per character), OUT/<stage>/metrics.jsonl of the training stages, OUT/curves.png (plot.py).
report.md holds the machine (CPU/GPU, torch, commit), the table (each stage's time, last training
loss, validation loss from start to end, bpc), DPO's reward margin and accuracy on its validation
pairs, the curves, and greedy answers of the final model (--model, default OUT/dpo/latest) to fixed
prompts. Greedy answers, fixed prompts and no dates: two runs, or two commits, compare with
`diff out/a/report.md out/b/report.md`.
"""

import argparse
import os
import platform
import subprocess
from pathlib import Path

import torch

from errors import NanozhError, exit_on_user_error
from eval import answer_prompts
from files import read_jsonl, write_text_atomic
from model import load, pick_device

STAGES = ["tokenizer", "data_pretrain", "data_sft", "data_dpo", "pretrain", "sft", "dpo"]
PROMPTS = ["你好，你是谁？", "用一句话介绍长城。", "天空为什么是蓝色的？", "写一首关于春天的短诗。", "一年有几个季节？"]


def _values(out: Path, stage: str, key: str) -> list:
    path = out / stage / "metrics.jsonl"
    return [r[key] for _, r in read_jsonl(path, skip_bad_last_line=True) if key in r] if path.exists() else []


def _start_end(out: Path, stage: str, key: str) -> str:
    v = _values(out, stage, key)
    return f"{v[0]:.3f} -> {v[-1]:.3f}" if v else "-"


def commit() -> str:
    """The commit of nanozh that made the run (with -dirty for uncommitted changes)."""
    git = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent)
    return git.stdout.strip() or "(not a git checkout)"


def machine() -> list[str]:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():  # Linux names the CPU model here; platform.processor() often does not
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return [f"CPU: {cpu}, {os.cpu_count()} cores", f"GPU: {gpu}", f"torch {torch.__version__}, "
            f"Python {platform.python_version()}, {platform.system()}", f"nanozh commit {commit()}"]


def summary(out: Path) -> str:
    """The table quickstart.sh prints at its end: time, losses and bpc per stage, then DPO's margin
    and reward accuracy on its validation pairs."""
    lines = [f"{'stage':<14}{'time':>7}  {'train loss':>10}  {'val loss (start -> end)':>24}  {'bpc':>6}"]
    total = 0
    for stage in STAGES:
        times = out / "times" / stage
        seconds = int(times.read_text()) if times.exists() else 0
        total += seconds
        loss = _values(out, stage, "loss")
        bpc = out / "bpc" / stage
        lines.append(f"{stage:<14}{f'{seconds}s' if times.exists() else '-':>7}  "
                     f"{f'{loss[-1]:.3f}' if loss else '-':>10}  {_start_end(out, stage, 'val_loss'):>24}"
                     f"  {f'{float(bpc.read_text()):.3f}' if bpc.exists() else '-':>6}")
    lines.append(f"{'total':<14}{total:>6}s")
    lines.append(f"DPO on the validation pairs: reward margin {_start_end(out, 'dpo', 'val_margin')}, reward accuracy "
                 f"{_start_end(out, 'dpo', 'val_reward_acc')} (ties count as wrong at the start)")
    lines.append("bpc: bits per character on data/corpus/heldout.parquet (lower is better)")
    return "\n".join(lines)


def chat_answers(model_dir: str, max_new_tokens: int) -> list[dict]:
    """Greedy answers of the model to PROMPTS (chat template), so they change only with the model."""
    device = pick_device("auto")
    model, tok = load(model_dir, device)
    return answer_prompts(model, tok, [(f"PROMPTS[{i}]", {"prompt": p}) for i, p in enumerate(PROMPTS)],
                          max_new_tokens=max_new_tokens, temperature=0.0)


def report(out: Path, table: str, answers: list[dict], model_dir: str) -> str:
    parts = ["# nanozh quick-start report", "", *[f"- {line}" for line in machine()], "", "## Stages", "",
             "```", table, "```", ""]
    if (out / "curves.png").exists():
        parts += ["## Curves", "", "![training curves](curves.png)", ""]
    shown = os.path.relpath(model_dir, out) if Path(model_dir).resolve().is_relative_to(out.resolve()) else model_dir
    parts += ["## Chat answers", "", f"Greedy answers of `{shown}` (relative to the report):", ""]
    for a in answers:
        parts += [f"**用户:** {a['prompt']}", "", f"**nanozh:** {a['answer'].strip() or '(nothing)'}"
                  f" ({a['tokens']} tokens, {a['finish']})", ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="the quick start's output directory (OUT, default out/quickstart)")
    p.add_argument("--model", help="the model whose chat answers go in the report (default: OUT/dpo/latest)")
    p.add_argument("--max_new_tokens", type=int, default=60)
    args = p.parse_args(argv)
    out = Path(args.out)
    model_dir = args.model or str(out / "dpo" / "latest")
    try:
        table = summary(out)
        print(table)
        write_text_atomic(out / "report.md", report(out, table, chat_answers(model_dir, args.max_new_tokens), model_dir))
    except NanozhError as e:
        exit_on_user_error(e)
    print(f"made by commit {commit()} of nanozh; the report is {out / 'report.md'}")


if __name__ == "__main__":
    main()
