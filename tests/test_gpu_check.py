"""bench/gpu_check.py: the dry run goes through every stage on the CPU and writes the results; a
stage that fails or hangs is recorded as such, killed with its children, and the next one runs."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def records(out: Path) -> dict[str, dict]:
    return {r["stage"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def test_dry_run_runs_every_stage_and_records_its_numbers(tmp_path):
    out = tmp_path / "check"
    run = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    got = records(out)
    serve = ["serve"] if (ROOT / "serve.py").exists() and (ROOT / "bench" / "serve.py").exists() else []
    assert list(got) == ["env", "data", "kernels-fp32", "attention", "train-tiny-triton", "train-tiny-sdpa", "sample",
                         *serve, "kernels-fp16"]
    assert all(r["status"] == "ok" and r["seconds"] > 0 for r in got.values())
    assert got["env"]["result"]["gpu"] is None and got["env"]["result"]["torch"]
    for dtype in ("fp32", "fp16"):  # the one-config tests, one per autotuned kernel, compared with fp64
        kernels = got[f"kernels-{dtype}"]["result"]
        assert kernels["passed"] == 3 and kernels["failed"] == []
    triton_row = next(r for r in got["attention"]["result"]["rows"] if r["impl"] == "triton")
    assert triton_row["fwd_bwd_tflops"] > 0 and "speedup_vs_sdpa" in triton_row
    for attn in ("triton", "sdpa"):  # the same steps on the same data: the same losses, both implementations
        row = got[f"train-tiny-{attn}"]["result"]["rows"][0]
        assert row["tok_s"] > 0 and len(row["losses"]) == 3
    losses = [got[f"train-tiny-{attn}"]["result"]["rows"][0]["losses"] for attn in ("triton", "sdpa")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert {(r["batch"], r["decode_tok_s"] > 0) for r in got["sample"]["result"]["rows"]} == {(1, True), (8, True)}
    summary = (out / "summary.md").read_text()
    assert all(f"| {name} | ok |" in summary for name in got)
    assert "===== kernels-fp16" in (out / "log.txt").read_text()


def alive(pid: int) -> bool:
    try:
        return " Z " not in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:4]
    except FileNotFoundError:
        return False


def test_failed_and_hung_stages_are_recorded_and_the_next_stage_runs(tmp_path, monkeypatch, capsys):
    pid_file = tmp_path / "grandchild.pid"
    # the hung stage starts a child of its own, which must die with it
    hang = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(120)")
    plan = [gpu_check.Stage("fails", 30, [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]),
            gpu_check.Stage("hangs", 3, [sys.executable, "-c", hang]),
            gpu_check.Stage("works", 30, [sys.executable, "-c", "print('fine')"])]
    monkeypatch.setattr(gpu_check, "stages", lambda args, work: plan)
    monkeypatch.setattr(sys, "argv", ["gpu_check", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main()
    assert exit_.value.code == 1
    got = records(tmp_path / "out")
    assert [(name, r["status"]) for name, r in got.items()] == [("fails", "failed"), ("hangs", "timeout"), ("works", "ok")]
    assert got["fails"]["exit_code"] == 3 and got["fails"]["tail"] == ["boom"]
    assert 3 <= got["hangs"]["seconds"] < 20 and got["hangs"]["tail"] == ["started"]
    assert not alive(int(pid_file.read_text()))
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| fails | failed |" in summary and "| hangs | timeout |" in summary and "| works | ok |" in summary
    assert "not ok: fails, hangs" in capsys.readouterr().out


def test_stages_past_the_budget_are_skipped_and_recorded(tmp_path, monkeypatch):
    plan = [gpu_check.Stage("first", 30, [sys.executable, "-c", "pass"]),
            gpu_check.Stage("second", 30, [sys.executable, "-c", "pass"])]
    monkeypatch.setattr(gpu_check, "stages", lambda args, work: plan)
    monkeypatch.setattr(sys, "argv", ["gpu_check", "--out", str(tmp_path), "--budget", "5"])
    with pytest.raises(SystemExit):
        gpu_check.main()
    got = records(tmp_path)
    assert [r["status"] for r in got.values()] == ["skipped", "skipped"]
    assert "budget spent" in got["second"]["reason"]
    assert "| second | skipped |" in (tmp_path / "summary.md").read_text()


def test_a_stopped_run_kills_its_stage_and_records_the_rest_as_skipped(tmp_path):
    # what the device's time limit does: SIGTERM to the check while a stage (and its child) runs
    pid_file, out = tmp_path / "grandchild.pid", tmp_path / "out"
    hang = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)")
    script = ("import sys\nfrom bench import gpu_check\n"
              f"plan = [gpu_check.Stage('hangs', 120, [sys.executable, '-c', {hang!r}]), "
              "gpu_check.Stage('next', 30, [sys.executable, '-c', 'pass'])]\n"
              "gpu_check.stages = lambda args, work: plan\n"
              f"sys.argv = ['gpu_check', '--out', {str(out)!r}]\n"
              "gpu_check.main()\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.terminate()
    assert proc.wait(timeout=30) == 1
    got = records(out)
    assert [(name, r["status"]) for name, r in got.items()] == [("hangs", "stopped"), ("next", "skipped")]
    assert not alive(int(pid_file.read_text()))


def test_failing_kernel_tests_are_named_in_the_results(tmp_path, monkeypatch):
    # how a broken autotune config reaches the summary: pytest's JUnit XML, read back by test name
    (tmp_path / "test_fake.py").write_text(
        "import pytest\n\ndef test_fine():\n    pass\n\n"
        "@pytest.mark.parametrize('config', ['fwd-M128-N128-w8-s3'])\n"
        "def test_every_autotune_config(config):\n    raise AssertionError('out of resource: shared memory')\n")
    xml = tmp_path / "kernels.xml"
    plan = [gpu_check.Stage("kernels-bf16", 60, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                                 str(tmp_path / "test_fake.py"), f"--junitxml={xml}"], {}, xml)]
    monkeypatch.setattr(gpu_check, "stages", lambda args, work: plan)
    monkeypatch.setattr(sys, "argv", ["gpu_check", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        gpu_check.main()
    record = records(tmp_path / "out")["kernels-bf16"]
    assert record["status"] == "failed" and record["result"]["passed"] == 1
    assert record["result"]["failed"] == [{"test": "test_every_autotune_config[fwd-M128-N128-w8-s3]",
                                           "message": "AssertionError: out of resource: shared memory"}]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "1 passed, 1 failed: test_every_autotune_config[fwd-M128-N128-w8-s3]" in summary
