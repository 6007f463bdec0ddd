"""Specification of plot.py (training curves from metrics.jsonl, inspected as a figure object, not
pixels) and report.py (the quick start's report, from a short real run of the tiny preset)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import plot
import report
from eval import answer_prompts
from model import load

# a run killed after step 30 and resumed from its step-20 checkpoint: steps 30 is logged twice (the
# second value is the one that counts), validation-only lines at 0 and 40, a last line cut short
LINES = [
    {"step": 0, "val_loss": 9.0},
    {"step": 10, "loss": 8.0, "lr": 1e-3, "grad_norm": 2.0, "tok_s": 1000.0, "ms": 100.0},
    {"step": 20, "loss": 7.0, "lr": 9e-4, "grad_norm": 1.5, "tok_s": 1000.0, "ms": 100.0},
    {"step": 30, "loss": 6.9, "lr": 8e-4, "grad_norm": 1.4, "tok_s": 1000.0, "ms": 100.0},
    {"step": 30, "loss": 6.5, "lr": 8e-4, "grad_norm": 1.2, "tok_s": 2000.0, "ms": 100.0},  # after the resume
    {"step": 40, "loss": 6.0, "lr": 7e-4, "grad_norm": 1.0, "tok_s": 2000.0, "ms": 100.0},
    {"step": 40, "val_loss": 6.2, "val_bpc": 3.1},
]


def write_run(path: Path, lines: list[dict], cut_last: bool = True) -> Path:
    path.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in lines) + ('{"step": 50, "lo' if cut_last else "")
    (path / "metrics.jsonl").write_text(text)
    return path


def series(fig, title: str) -> dict[str, tuple[list, list]]:
    [ax] = [ax for ax in fig.axes if ax.get_visible() and ax.get_title() == title]
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_a_resumed_run_with_validation_lines_plots_one_value_per_step(tmp_path):
    run = write_run(tmp_path / "pretrain", LINES)
    fig = plot.plot_runs({"pretrain": plot.read_metrics(str(run))})
    visible = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert visible == ["loss vs step", "loss vs tokens", "bits per character vs step", "learning rate vs step",
                       "grad norm vs step", "tokens/s vs step"]
    loss = series(fig, "loss vs step")
    assert loss == {"pretrain loss": ([10, 20, 30, 40], [8.0, 7.0, 6.5, 6.0]),
                    "pretrain val_loss": ([0, 40], [9.0, 6.2])}
    # positions per step = tok_s x ms / 1000: 100 a step to step 20, then 200
    assert series(fig, "loss vs tokens")["pretrain loss"][0] == [1000, 2000, 4000, 6000]
    assert series(fig, "bits per character vs step") == {"pretrain val_bpc": ([40], [3.1])}
    assert sum(len(ax.get_lines()) for ax in fig.axes) == 2 + 2 + 1 + 1 + 1 + 1


def test_several_runs_are_overlaid_with_their_names_and_the_png_is_written(tmp_path, capsys):
    a = write_run(tmp_path / "a" / "sft", LINES[:3])
    b = write_run(tmp_path / "b" / "sft", [{"step": 5, "loss": 1.0, "lr": 1e-4, "tok_s": 10.0, "ms": 1.0}], False)
    c = write_run(tmp_path / "dpo", [{"step": 5, "loss": 0.69, "grad_norm": 0.1}], False)
    out = tmp_path / "curves.png"
    plot.main([str(a), str(b), str(c), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip() == f"plotted 3 runs (5 logged steps) to {out}"
    fig = plot.plot_runs({name: plot.read_metrics(str(d)) for name, d in zip(plot.run_names([str(a), str(b), str(c)]),
                                                                            [a, b, c])})
    assert set(series(fig, "loss vs step")) == {f"{a} loss", f"{a} val_loss", f"{b} loss", "dpo loss"}
    assert not any(ax.get_visible() and "bits per character" in ax.get_title() for ax in fig.axes)  # none logged


def test_grpo_and_dpo_runs_get_their_reward_panels(tmp_path):
    grpo = write_run(tmp_path / "grpo", [{"step": 1, "loss": 0.1, "reward": 0.3, "acc": 0.25},
                                         {"step": 2, "loss": 0.1, "reward": 0.8, "acc": 0.75},
                                         {"step": 2, "val_acc": 1.0}], False)
    dpo = write_run(tmp_path / "dpo", [{"step": 1, "loss": 0.69, "reward_acc": 0.5}], False)
    fig = plot.plot_runs({"grpo": plot.read_metrics(str(grpo)), "dpo": plot.read_metrics(str(dpo))})
    assert series(fig, "reward vs step") == {"grpo reward": ([1, 2], [0.3, 0.8]), "grpo acc": ([1, 2], [0.25, 0.75]),
                                             "grpo val_acc": ([2], [1.0])}
    assert series(fig, "DPO reward accuracy vs step") == {"dpo reward_acc": ([1], [0.5])}


def test_a_directory_without_metrics_or_a_line_without_a_step_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path / "empty")])
    assert capsys.readouterr().err == f"nanozh: {tmp_path / 'empty' / 'metrics.jsonl'}: no metrics.jsonl here " \
                                      "(pass a training run's --out_dir)\n"
    bad = write_run(tmp_path / "bad", [{"step": 1, "loss": 1.0}, {"loss": 2.0}, {"step": 3, "loss": 1.0}])
    with pytest.raises(SystemExit):
        plot.main([str(bad)])
    assert capsys.readouterr().err.startswith(f"nanozh: {bad / 'metrics.jsonl'}:2: not a metrics line")


def test_the_report_of_a_real_tiny_run_names_machine_stages_curves_and_greedy_answers(pretrained, tmp_path, capsys):
    """A quick-start directory whose pretrain stage is a short real run of the tiny preset
    (the shared `pretrained` fixture); the report is written twice and comes out the same."""
    out = tmp_path / "quickstart"
    shutil.copytree(pretrained.parent, out / "pretrain", symlinks=True)
    (out / "times").mkdir()
    (out / "bpc").mkdir()
    for stage, seconds in [("tokenizer", 4), ("pretrain", 7)]:
        (out / "times" / stage).write_text(f"{seconds}\n")
    (out / "bpc" / "pretrain").write_text("6.25\n")
    plot.main([str(out / "pretrain"), "--out", str(out / "curves.png")])
    model = str(out / "pretrain" / "latest")
    report.main([str(out), "--model", model, "--max_new_tokens", "8"])
    first = (out / "report.md").read_text()
    report.main([str(out), "--model", model, "--max_new_tokens", "8"])
    assert (out / "report.md").read_text() == first  # greedy, fixed prompts, no dates: diffable
    printed = capsys.readouterr().out

    losses = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    last_loss = [r["loss"] for r in losses if "loss" in r][-1]
    [row] = [line for line in first.splitlines() if line.startswith("pretrain ")]
    assert row.split() == ["pretrain", "7s", f"{last_loss:.3f}", "-", "6.250"]  # --eval_every=0: no val loss
    assert row in printed and f"the report is {out / 'report.md'}" in printed
    assert f"- GPU: {'none' if not torch.cuda.is_available() else torch.cuda.get_device_name(0)}" in first
    assert f"torch {torch.__version__}" in first and f"nanozh commit {report.commit()}" in first
    assert "![training curves](curves.png)" in first and (out / "curves.png").exists()
    net, tok = load(model, "cpu")
    answers = answer_prompts(net, tok, [("", {"prompt": p}) for p in report.PROMPTS], max_new_tokens=8)
    for a in answers:
        assert f"**用户:** {a['prompt']}\n\n**nanozh:** {a['answer'].strip() or '(nothing)'} ({a['tokens']} tokens" in first
