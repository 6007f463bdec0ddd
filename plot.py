"""Training curves of one or more runs as a PNG, from each OUT_DIR/metrics.jsonl.

    python plot.py out/pretrain --out pretrain.png
    python plot.py out/quickstart/pretrain out/quickstart/sft out/quickstart/dpo --out curves.png

Panels: training loss (solid) and validation loss (dashed, dots) against steps and against
tokens; bits per character where a run logged any (a key with "bpc" in it); GRPO's reward and
accuracy and DPO's reward accuracy where logged; learning rate; grad norm; tokens/s. Several runs are overlaid, one colour each, named by their directory. A run that
was killed and resumed logged some steps twice: the last value of each metric at each step is the
one plotted. Tokens are the positions the model computed (padding included), summed over the log
lines as steps x tok_s x ms per step, the two rates each line carries.

The figure is built without pyplot, so matplotlib renders the PNG with its Agg backend: no display
is needed (servers, CI, SSH sessions), and no global figure state is left behind.
"""

import argparse
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from errors import NanozhError, exit_on_user_error, user_error
from files import atomic_path, read_jsonl

PANELS = [  # (title, metric keys drawn on it, x axis)
    ("loss", ["loss", "val_loss"], "step"),
    ("loss", ["loss", "val_loss"], "tokens"),
    ("bits per character", ["bpc"], "step"),  # any key with "bpc" in it
    ("reward", ["reward", "acc", "val_reward", "val_acc"], "step"),  # GRPO: mean reward, accuracy
    ("DPO reward accuracy", ["reward_acc", "val_reward_acc"], "step"),
    ("learning rate", ["lr"], "step"),
    ("grad norm", ["grad_norm"], "step"),
    ("tokens/s", ["tok_s"], "step"),
]


def read_metrics(run: str) -> dict[int, dict]:
    """{step: {metric: value}} of a run directory (or its metrics.jsonl), the last value of each
    metric at each step; a last line cut short by a kill is skipped."""
    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise user_error(str(path), "no metrics.jsonl here", "pass a training run's --out_dir")
    steps: dict[int, dict] = {}
    for n, rec in read_jsonl(path, skip_bad_last_line=True):
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise user_error(str(path), "not a metrics line (no integer \"step\")", "a train_*.py metrics.jsonl", line=n)
        steps.setdefault(rec["step"], {}).update(rec)
    if not steps:
        raise user_error(str(path), "no metrics logged yet", "let the run log a step (--log_every)")
    return dict(sorted(steps.items()))


def with_tokens(metrics: dict[int, dict]) -> dict[int, dict]:
    """Each step's metrics plus "tokens": positions computed up to that step. A training line's
    tok_s x ms / 1000 is its positions per step (both are measured over the same interval)."""
    tokens, last_step, per_step = 0.0, 0, 0.0
    for step, m in metrics.items():
        if "tok_s" in m and "ms" in m:
            per_step = m["tok_s"] * m["ms"] / 1000
        tokens += (step - last_step) * per_step  # a validation-only line uses the rate logged before it
        m["tokens"], last_step = tokens, step
    return metrics


def _series(metrics: dict[int, dict], key: str, x: str) -> tuple[list, list]:
    points = [(m[x], m[key]) for m in metrics.values() if m.get(key) is not None and x in m]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(runs: dict[str, dict[int, dict]]) -> Figure:
    """One figure of the panels that have data, the runs overlaid (name -> {step: metrics})."""
    runs = {name: with_tokens(m) for name, m in runs.items()}
    panels = []
    for title, keys, x in PANELS:
        if keys == ["bpc"]:  # whatever bpc keys the runs logged (bpc, val_bpc, ...)
            keys = sorted({k for m in runs.values() for line in m.values() for k in line if "bpc" in k})
        if any(_series(m, k, x)[0] for m in runs.values() for k in keys):
            panels.append((title, keys, x))
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig = Figure(figsize=(5.5 * cols, 3.8 * rows), layout="tight")
    axes = fig.subplots(rows, cols, squeeze=False)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, keys, x) in zip(axes.flat, panels):
        for i, (name, metrics) in enumerate(runs.items()):
            for key in keys:
                xs, ys = _series(metrics, key, x)
                if not xs:
                    continue
                val = key.startswith("val_")
                ax.plot(xs, ys, color=colors[i % len(colors)], linestyle="--" if val else "-",
                        marker="o" if val else None, markersize=3, label=f"{name} {key}")
        ax.set_title(f"{title} vs {x}")
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    return fig


def run_names(dirs: list[str]) -> list[str]:
    """Each run's directory name, or its whole path where two runs share a name."""
    names = [Path(d).name if Path(d).is_dir() else Path(d).parent.name for d in dirs]
    return [n if names.count(n) == 1 else d for n, d in zip(names, dirs)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", metavar="OUT_DIR", help="training run directories (or metrics.jsonl files)")
    p.add_argument("--out", help="the PNG to write (default: the first run's curves.png)")
    args = p.parse_args(argv)
    try:
        runs = {name: read_metrics(d) for name, d in zip(run_names(args.runs), args.runs)}
        out = Path(args.out or Path(args.runs[0]) / "curves.png")
        fig = plot_runs(runs)
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    except NanozhError as e:
        exit_on_user_error(e)
    steps = sum(len(m) for m in runs.values())
    print(f"plotted {len(runs)} run{'s' * (len(runs) > 1)} ({steps} logged steps) to {out}")


if __name__ == "__main__":
    main()
