"""Every check that needs a GPU, in one command that cannot hang, for the short windows a GPU is lent.

    bash bench/gpu_check.sh                          # on a CUDA machine: about 8 minutes (--budget 480)
    bash bench/gpu_check.sh --out DIR --budget 540   # results into DIR instead of gpu_check/<time>/
    bash bench/gpu_check.sh --only kernels,train-100m   # some stages (names or name prefixes)
    bash bench/gpu_check.sh --dry-run                # on a CPU: every stage at toy size, to check the script

Stages, most important first (a run cut short by --budget loses the least):
    env                  GPU, memory, compute capability, SMs, driver, torch/triton/CUDA versions
    data                 the bundled corpus tokenized into pretraining shards (python -m data.prepare)
    kernels-bf16         tests/test_attention.py compiled on the GPU (not the interpreter) in bf16: the
                         suite's shapes plus head dim 128 and T up to 4096, vs the fp64 reference, and
                         each autotune config alone, so a failing one is named
    attention            python -m bench.attention: TFLOP/s forward, backward, both; causal bf16, D 64
                         and 128, T 1024..8192, triton vs the fastest SDPA backend; peak memory
    train-P-A            python -m bench.train on the bundled data, bf16, preset P (26m, 100m), attention A
                         (triton, sdpa): tokens/s, MFU, peak memory, the logged losses
    sample               python -m bench.sample: decode tokens/s, 1 stream and 8 together (26m, 100m)
    serve                python -m bench.serve, only where serve.py and bench/serve.py exist: 1 and 8
                         concurrent streaming clients (26m, 100m); its table is kept from its output
    kernels-fp16         the kernel tests again in fp16
    train-P-A-compile    as train-P-A, with --compile
--dry-run runs the same stages on the CPU at toy size: the kernels under the Triton interpreter in
fp32 and fp16 (numpy has no bf16; only the one-config tests, the test suite runs the rest), the
tiny preset, a few steps; it leaves out the --compile variants (torch.compile of even the tiny
model takes about a minute on 2 CPU cores; the tests train with --compile on the CPU already).

Each stage is a subprocess in its own process group with a time box, never longer than what is left
of --budget: one that fails or runs out of time is recorded as such, killed with its children, and
the next one runs. After every stage, OUT/results.jsonl gets its line (status, seconds, command,
numbers, the end of its output when it failed), OUT/summary.md is rewritten and OUT/log.txt holds
everything every stage printed; so whatever stops the run, what finished is on disk.
"""

import argparse
import importlib.util
import json
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from files import write_text_atomic

MIN_SECONDS = 15  # a stage with less than this left of the budget is skipped, not started
# what each number is compared against (README, "Tests and benchmarks")
REFERENCE = {
    "kernels": "every test passes",
    "attention": "FlashAttention-2 on an H100: ~330 TFLOP/s forward+backward, causal, d128",
    "train": "nanochat: 41-46% MFU at this scale; the loss falls",
    "sample": "8 streams decode well over 3x the tokens/s of one",
    "serve": "8 clients get well over 3x the tokens/s of one",
}


@dataclass
class Stage:
    name: str
    box: float                  # seconds
    cmd: list[str]
    env: dict = field(default_factory=dict)
    result: Path | None = None  # the JSON (or JUnit XML) file the command writes


def stages(args: argparse.Namespace, work: Path) -> list[Stage]:
    """The stages of a GPU run, or of a --dry-run on the CPU at toy size."""
    py, dry = [sys.executable, "-m"], args.dry_run
    shards = work / "shards"
    cpu = {"TRITON_INTERPRET": "1"} if dry else {}
    kernel_dtypes = ["fp32", "fp16"] if dry else ["bf16", "fp16"]

    def kernels(dtype: str) -> Stage:
        xml = work / f"kernels-{dtype}.xml"
        # parallel workers compile the kernels' variants side by side on the GPU machine's 16 cores
        workers = ["-n", "8"] if not dry and importlib.util.find_spec("xdist") else []
        # the dry run runs only the one-config tests: the whole file is in the test suite already
        subset = ["-k", "every_autotune_config"] if dry else []
        return Stage(f"kernels-{dtype}", 150, [*py, "pytest", "-v", "-rf", "-p", "no:cacheprovider", *workers, *subset,
                                               "tests/test_attention.py", f"--junitxml={xml}"],
                     {**cpu, "NANOZH_TEST_DTYPE": dtype}, xml)

    def train(preset: str, attn: str, compile_: int) -> Stage:
        size = (["--batch_size", "1", "--block_size", "32", "--steps", "2", "--warmup", "1", "--device", "cpu",
                 "--dtype", "float32"] if dry else
                ["--batch_size", "32", "--steps", "80", "--warmup", "10", "--device", "cuda", "--dtype", "bfloat16"])
        out = work / f"train-{preset}-{attn}-{compile_}.json"
        return Stage(f"train-{preset}-{attn}" + ("-compile" if compile_ else ""), 150 if compile_ else 75,
                     [*py, "bench.train", "--presets", preset, "--attn", attn, "--compile", str(compile_), "--loops",
                      "trainer", "--data", str(shards), *size, "--json", str(out)], cpu, out)

    presets = ["tiny"] if dry else ["26m", "100m"]
    env_json, attn_json, sample_json = work / "env.json", work / "attention.json", work / "sample.json"
    attention = (["--device", "cpu", "--dtype", "fp32", "--dims", "32", "--seqlens", "64", "--batch", "1", "--heads",
                  "2", "--impls", "triton,sdpa", "--rep", "10"] if dry else
                 ["--dims", "64,128", "--seqlens", "1024,2048,4096,8192", "--impls", "triton,sdpa", "--rep", "50"])
    sample = (["--presets", "tiny", "--device", "cpu", "--dtype", "float32", "--prompt_len", "8", "--new_tokens", "8",
               "--prefill_len", "32"] if dry else
              ["--presets", "26m,100m", "--device", "cuda", "--dtype", "bfloat16", "--new_tokens", "256"])
    plan = [
        Stage("env", 60, [*py, "bench.gpu_check", "--env", str(env_json)], {}, env_json),
        Stage("data", 120, [*py, "data.prepare", "--kind", "pretrain", "--input", "data/corpus/pretrain", "--tokenizer",
                            "tokenizer/tokenizer.model", "--out", str(shards), "--workers", "2" if dry else "8"]),
        kernels(kernel_dtypes[0]),
        Stage("attention", 120, [*py, "bench.attention", *attention, "--json", str(attn_json)], cpu, attn_json),
        *[train(p, a, 0) for p in presets for a in ("triton", "sdpa")],
        Stage("sample", 90, [*py, "bench.sample", *sample, "--batch", "1,8", "--json", str(sample_json)], cpu,
              sample_json),
    ]
    if (ROOT / "serve.py").exists() and (ROOT / "bench" / "serve.py").exists():
        serve = args.serve_args or ("--presets tiny --clients 1,8 --requests 1 --max_tokens 8 --device cpu" if dry else
                                    "--presets 26m,100m --clients 1,8 --max_tokens 256 --device cuda")
        plan.append(Stage("serve", 120, [*py, "bench.serve", *shlex.split(serve)], cpu))
    plan += [kernels(kernel_dtypes[1]), *([] if dry else [train(p, a, 1) for p in presets for a in ("triton", "sdpa")])]
    if args.only:
        wanted = args.only.split(",")
        if any(w.startswith("train") for w in wanted):
            wanted.append("data")  # training reads the shards that stage writes
        plan = [s for s in plan if any(s.name == w or s.name.startswith(w + "-") for w in wanted)]
    return plan


# ----------------------------------------------------------------------------------------------
# running a stage

def run_stage(stage: Stage, timeout: float, log_path: Path) -> dict:
    """Run one stage's command in its own process group, its output appended to log_path; kill the
    group when the command ends (whatever it left running: serve.py's servers, compile workers), at
    the timeout, or when this process is stopped. Returns status (ok, failed, timeout), exit code,
    seconds and the output's last lines."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **stage.env}
    with open(log_path, "ab") as log:
        log.write(f"\n===== {stage.name} (time box {timeout:.0f} s): {shlex.join(stage.cmd)}\n".encode())
        log.flush()
        start, t0, cpu0 = log.tell(), time.monotonic(), children_cpu()
        # a process group, not a session: whoever stops this run's session stops the stage's too
        proc = subprocess.Popen(stage.cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=os.setpgrp)
        code = None
        try:
            code = proc.wait(timeout=timeout)
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            status = "timeout"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        seconds, cpu = time.monotonic() - t0, children_cpu() - cpu0
    with open(log_path, "rb") as log:
        log.seek(start)
        output = log.read().decode("utf-8", "replace")
    # progress bars redraw with carriage returns: keep their last state only
    lines = [line.rsplit("\r", 1)[-1] for line in output.splitlines()]
    return {"status": status, "exit_code": code, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
            "tail": [line for line in lines if line.strip()][-25:]}


def children_cpu() -> float:
    """CPU seconds used so far by the finished child processes (and theirs): next to the wall
    time, it tells a slow stage from a busy machine."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def read_result(stage: Stage) -> dict:
    """The numbers the stage's command wrote, or {} when it wrote none."""
    if stage.result is None or not stage.result.exists():
        return {}
    if stage.result.suffix == ".xml":
        return junit(stage.result)
    return json.loads(stage.result.read_text())


def with_result(stage: Stage, record: dict) -> dict:
    """The record of a finished stage with the numbers it wrote; a stage that writes no file (data,
    serve) reports in what it printed."""
    if stage.result and not stage.result.exists() and record["status"] == "ok":
        record["status"] = "failed"
        record["tail"].append(f"gpu_check: the stage wrote no {stage.result.name}")
    try:
        record["result"] = read_result(stage) if stage.result else {"output": record["tail"][-12:]}
    except (ValueError, ET.ParseError) as e:
        record["result"], record["status"] = {}, "failed"
        record["tail"].append(f"gpu_check: unreadable result {stage.result.name}: {e}")
    # bench.train records a failed variant in its rows and exits 0
    if stage.name.startswith("train") and any("error" in row for row in record["result"].get("rows", [])):
        record["status"] = "failed"
    return record


def junit(path: Path) -> dict:
    """Counts, and the name and message of every failed test, from pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = [{"test": case.get("name"), "message": (bad.get("message") or "").split("\n")[0][:300]}
              for case in root.iter("testcase") for bad in case if bad.tag in ("failure", "error")]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": failed}


# ----------------------------------------------------------------------------------------------
# the environment stage (runs in its own process, like the others)

def environment() -> dict:
    import torch
    import triton

    def command(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    info = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count(),
            "commit": command("git", "rev-parse", "--short", "HEAD") or "unknown",
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpus=torch.cuda.device_count(), memory_gib=round(p.total_memory / 2**30, 1),
                    capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    bf16=torch.cuda.is_bf16_supported(),
                    driver=command("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"))
    else:
        info["gpu"] = None
    return info


# ----------------------------------------------------------------------------------------------
# the summary

def headline(name: str, r: dict) -> str:
    """One line of the stage's numbers for the summary table."""
    res = r.get("result") or {}
    if name == "env" and res:
        if not res.get("gpu"):
            return f"no GPU; torch {res['torch']}, triton {res['triton']}, {res['cpus']} CPUs"
        return (f"{res['gpu']} x{res['gpus']}, {res['memory_gib']} GiB, cc {res['capability']}, {res['sms']} SMs, "
                f"driver {res['driver']}, torch {res['torch']}, triton {res['triton']}, CUDA {res['cuda']}")
    if name.startswith("kernels") and res:
        names = ", ".join(f["test"] for f in res["failed"][:6])
        return f"{res['passed']} passed, {res['failures'] + res['errors']} failed" + (f": {names}" if names else "")
    if name == "attention" and res:
        best = [row for row in res["rows"] if row["impl"] == "triton" and "fwd_bwd_tflops" in row]
        if best:
            top = max(best, key=lambda row: (row["D"], row["T"]))
            ratio = top.get("speedup_vs_sdpa", {}).get("fwd_bwd")
            return (f"triton D={top['D']} T={top['T']}: f+b {top['fwd_bwd_tflops']:.1f} TFLOP/s"
                    + (f", {ratio:.2f}x SDPA" if ratio else ""))
    if name.startswith("train") and res.get("rows"):
        row = res["rows"][0]
        if "error" in row:
            return f"error: {row['error'][:200]}"
        mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        losses = row["losses"]
        loss = (f"{losses[0]:.2f} -> {losses[-1]:.2f} ({'falls' if losses[-1] < losses[0] else 'does not fall'})"
                if losses else "-")
        return f"{row['tok_s']:,.0f} tok/s, MFU {mfu}, {row['mem_gib']:.1f} GiB, loss {loss}"
    if name == "sample" and res.get("rows"):
        return "; ".join(f"{row['preset']} x{row['batch']}: {row['decode_tok_s']:,.0f} tok/s" for row in res["rows"])
    if r["status"] != "ok" and r.get("tail"):
        return r["tail"][-1][:200]
    if name == "serve" and res.get("output"):
        return "the table below"
    return res.get("output", [""])[-1][:200]


def tables(results: list[dict]) -> list[str]:
    """The full tables of the attention, training and sampling stages."""
    out = []
    by_name = {r["stage"]: r.get("result") or {} for r in results}
    attn = by_name.get("attention", {}).get("rows")
    if attn:
        out += ["", f"### attention ({by_name['attention']['dtype']}, B={by_name['attention']['B']} "
                    f"H={by_name['attention']['H']}, causal)", "",
                "| D | T | impl | fwd TFLOP/s | bwd TFLOP/s | f+b TFLOP/s | peak MiB | triton/sdpa f+b |", "|---|---|---|---|---|---|---|---|"]
        for row in attn:
            if "error" in row:
                out.append(f"| {row['D']} | {row['T']} | {row['name']} | {row['error']} | | | | |")
                continue
            peak = "n/a" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
            ratio = row.get("speedup_vs_sdpa", {}).get("fwd_bwd")
            out.append(f"| {row['D']} | {row['T']} | {row['name']} | {row['fwd_tflops']:.1f} | {row['bwd_tflops']:.1f} | "
                       f"{row['fwd_bwd_tflops']:.1f} | {peak} | {f'{ratio:.2f}x' if ratio else ''} |")
    train = [(r["stage"], (r.get("result") or {}).get("rows", [{}])[0]) for r in results if r["stage"].startswith("train")]
    if train:
        out += ["", "### training (bench.train, train_pretrain.py's loop, bundled data)", "",
                "| stage | dtype | batch x block | tokens/s | MFU | peak GiB | logged losses |", "|---|---|---|---|---|---|---|"]
        for name, row in train:
            if "tok_s" not in row:
                out.append(f"| {name} | | | {row.get('error', 'no result')[:200]} | | | |")
                continue
            mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
            losses = " ".join(f"{x:.2f}" for x in row["losses"])
            out.append(f"| {name} | {row['dtype']} | {row['batch_size']} x {row['block_size']} | {row['tok_s']:,.0f} | {mfu} | "
                       f"{row['mem_gib']:.2f} | {losses} |")
    sample = by_name.get("sample", {}).get("rows")
    if sample:
        out += ["", f"### decoding (bench.sample, {by_name['sample']['dtype']}, greedy, random weights)", "",
                "| preset | streams | prefill tok/s | decode tok/s, KV cache | no cache |", "|---|---|---|---|---|"]
        out += [f"| {row['preset']} | {row['batch']} | {row['prefill_tok_s']:,.0f} | {row['decode_tok_s']:,.1f} | "
                f"{row['decode_no_cache_tok_s']:,.1f} |" for row in sample]
    serve = [line for line in by_name.get("serve", {}).get("output", []) if line.startswith("|")]
    if serve:
        out += ["", "### serving (bench.serve: concurrent streaming clients against serve.py)", "", *serve]
    return out


def summary(meta: dict, results: list[dict], pending: list[str]) -> str:
    lines = [f"# gpu_check {meta['started']}{' (dry run on the CPU)' if meta['dry_run'] else ''}", "",
             f"`{meta['command']}`, commit {meta['commit']}, budget {meta['budget']} s", "",
             "| stage | status | seconds | numbers | compared against |", "|---|---|---|---|---|"]
    for r in results:
        ref = next((v for k, v in REFERENCE.items() if r["stage"].startswith(k)), "")
        lines.append(f"| {r['stage']} | {r['status']} | {r.get('seconds', '')} | {headline(r['stage'], r)} | {ref} |")
    lines += [f"| {name} | not run yet | | | |" for name in pending]
    lines += tables(results)
    for r in results:
        if r["status"] in ("failed", "timeout") and r.get("tail"):
            lines += ["", f"### {r['stage']}: {r['status']} (the end of its output; all of it is in log.txt)", "", "```",
                      *r["tail"], "```"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="every stage at toy size on the CPU")
    p.add_argument("--out", help="results directory (default: gpu_check/<UTC time>)")
    p.add_argument("--budget", type=float, default=480, help="seconds for the whole run; stages past it are skipped")
    p.add_argument("--only", default="", help="comma-separated stage names or prefixes (kernels, train-26m, ...)")
    p.add_argument("--serve_args", default="", help="arguments for python -m bench.serve")
    p.add_argument("--env", help=argparse.SUPPRESS)  # the env stage, in its own process
    args = p.parse_args()
    if args.env:
        write_text_atomic(args.env, json.dumps(environment(), indent=1))
        return

    deadline = time.monotonic() + args.budget
    started = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else ROOT / "gpu_check" / (started + ("-dry-run" if args.dry_run else ""))
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    meta = {"started": started, "dry_run": args.dry_run, "budget": args.budget, "commit": commit or "unknown",
            "command": "bash bench/gpu_check.sh " + shlex.join(sys.argv[1:])}
    if args.dry_run:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # small CPUs: see DEVELOPERS.md
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops a run as Ctrl-C does
    results: list[dict] = []
    stopped = False
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        plan = stages(args, Path(tmp))
        for i, stage in enumerate(plan):
            left = deadline - time.monotonic()
            print(f"gpu_check [{i + 1}/{len(plan)}] {stage.name} ...", flush=True)
            if stopped:
                record = {"status": "skipped", "reason": "the run was stopped"}
            elif left < MIN_SECONDS:
                record = {"status": "skipped", "reason": f"budget spent ({left:.0f} s of {args.budget:.0f} s left)"}
            else:
                try:
                    record = with_result(stage, run_stage(stage, min(stage.box, left), out / "log.txt"))
                except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the stage was killed; the rest are skipped
                    record, stopped = {"status": "stopped"}, True
            record = {"stage": stage.name, **record, "command": shlex.join(stage.cmd), "at": time.time()}
            if record["status"] == "ok":
                record.pop("tail", None)
            results.append(record)
            with open(out / "results.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({**meta, **record}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            write_text_atomic(out / "summary.md", summary(meta, results, [s.name for s in plan[i + 1:]]))
            print(f"gpu_check [{i + 1}/{len(plan)}] {stage.name}: {record['status']}"
                  f"{' in %.0f s' % record['seconds'] if 'seconds' in record else ''}  {headline(stage.name, record)}",
                  flush=True)
    print("\n" + (out / "summary.md").read_text())
    bad = [r["stage"] for r in results if r["status"] != "ok"]
    print(f"gpu_check: {len(results) - len(bad)} of {len(results)} stages ok"
          + (f"; not ok: {', '.join(bad)}" if bad else "") + f"; results in {out}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
