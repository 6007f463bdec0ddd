"""quickstart.sh as a process: one run per output directory, no stage outliving a killed script, a
killed training stage resumed. The script runs from a copy of the repository whose .venv holds fake
python, pip and torchrun (each logs its arguments and returns at once; one can be told to hang),
so every test takes seconds; the last test keeps the real torchrun to see it stop its workers."""

import os
import signal
import subprocess
import time
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGE_PATTERN = "data.train_tokenizer"  # the first stage: the one the hanging tests stop in

# Every command the script runs through .venv: log it; answer the NPROC question; if its arguments
# contain $FAKE_HANG, write its PID to $FAKE_PIDFILE and wait there (as a stage that trains for long).
FAKE_TOOL = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$FAKE_LOG"
case "$*" in *"import os, torch"*) echo "${FAKE_NPROC:-2}" ;; esac
if [ -n "${FAKE_HANG:-}" ] && [[ "$*" == *"$FAKE_HANG"* ]]; then
    echo $$ > "$FAKE_PIDFILE.tmp" && mv "$FAKE_PIDFILE.tmp" "$FAKE_PIDFILE"
    exec sleep 300
fi
"""


@pytest.fixture
def repo(tmp_path) -> typing.Iterator[Path]:
    """A copy of quickstart.sh beside a requirements.txt and a .venv of fake tools."""
    repo = tmp_path / "repo"
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / "quickstart.sh").write_text((ROOT / "quickstart.sh").read_text())
    (repo / "requirements.txt").write_text("torch\n")
    for tool in ["python", "pip", "torchrun"]:
        path = repo / ".venv" / "bin" / tool
        path.write_text(FAKE_TOOL)
        path.chmod(0o755)
    yield repo
    pidfile = repo / "stage.pid"  # a stage left behind by a failing test does not wait out its sleep
    if pidfile.exists() and alive(pid := int(pidfile.read_text())):
        os.kill(pid, signal.SIGKILL)


def start(repo: Path, *args: str, hang: str = "", **env: str) -> subprocess.Popen:
    env = {**os.environ, "OUT": str(repo / "out"), "FAKE_LOG": str(repo / "calls.log"),
           "FAKE_PIDFILE": str(repo / "stage.pid"), "FAKE_HANG": hang, **env}
    return subprocess.Popen(["bash", str(repo / "quickstart.sh"), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run(repo: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    proc = start(repo, *args, **env)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def calls(repo: Path) -> list[str]:
    log = repo / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def stage_pid(repo: Path, proc: subprocess.Popen) -> int:
    """The PID of the hanging stage, once the script has started it."""
    deadline = time.monotonic() + 30
    while not (repo / "stage.pid").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the stage did not start"
        time.sleep(0.05)
    return int((repo / "stage.pid").read_text())


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its (re)parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
    proc.communicate(timeout=30)


def test_a_whole_run_with_fake_tools_calls_every_stage(repo):
    result = run(repo)
    assert result.returncode == 0, result.stderr
    log = "\n".join(calls(repo))
    for script in ["data.train_tokenizer", "data.prepare --kind dpo", "train_pretrain.py", "train_sft.py",
                   "train_dpo.py", "plot.py", "report.py", "sample.py"]:
        assert script in log
    assert "--resume" not in log  # nothing to resume in a fresh directory


def test_a_second_run_into_the_same_out_exits_at_once_naming_the_first(repo):
    first = start(repo, hang=STAGE_PATTERN)
    try:
        stage_pid(repo, first)
        t0 = time.monotonic()
        second = run(repo)
        assert time.monotonic() - t0 < 10
        assert second.returncode == 1
        assert f"nanozh: {repo / 'out'}: in use by another quickstart (PID {first.pid})" in second.stderr
        assert "OUT=" in second.stderr and len(second.stderr.strip().splitlines()) == 1
        assert sum(STAGE_PATTERN in line for line in calls(repo)) == 1  # the second started nothing
    finally:
        stop(first)


def test_redo_of_a_second_run_deletes_nothing(repo):
    first = start(repo, hang=STAGE_PATTERN)
    try:
        stage_pid(repo, first)
        (repo / "out" / "keep").write_text("the first run's output")
        assert run(repo, "--redo").returncode == 1
        assert (repo / "out" / "keep").exists()
    finally:
        stop(first)


def test_kill_9_of_the_script_stops_its_stage_and_frees_the_directory(repo):
    first = start(repo, hang=STAGE_PATTERN)
    pid = stage_pid(repo, first)
    first.kill()  # SIGKILL: no trap runs
    first.communicate(timeout=30)
    assert gone_within(pid, 5), "the stage outlived the script"
    again = run(repo)  # the killed stage runs again, and the rest after it
    assert again.returncode == 0, again.stderr
    assert sum(STAGE_PATTERN in line for line in calls(repo)) == 2


def test_a_checkpoint_without_latest_is_resumed(repo):
    # killed between the rename of step_0000100 and the update of `latest`
    (repo / "out" / "pretrain" / "step_0000100").mkdir(parents=True)
    (repo / "out" / "sft" / ".tmp_step_0000125").mkdir(parents=True)  # half-written: not a checkpoint
    result = run(repo)
    assert result.returncode == 0, result.stderr
    [pretrain] = [line for line in calls(repo) if "train_pretrain.py" in line]
    [sft] = [line for line in calls(repo) if "train_sft.py" in line]
    assert pretrain.endswith(" --resume")
    assert "--resume" not in sft


def test_pip_runs_only_when_requirements_change(repo):
    def pip_calls() -> int:
        return sum(line.startswith("pip ") for line in calls(repo))
    assert run(repo).returncode == 0
    assert pip_calls() == 1
    assert run(repo).returncode == 0
    assert pip_calls() == 1
    (repo / "requirements.txt").write_text("torch\nnumpy\n")
    assert run(repo).returncode == 0
    assert pip_calls() == 2


def test_kill_9_of_the_script_stops_torchrun_and_its_workers(repo):
    """The real torchrun, running a stand-in training script that only waits: torchrun gets the
    SIGTERM when the script dies and passes it on to its worker."""
    (repo / ".venv" / "bin" / "torchrun").unlink()
    (repo / ".venv" / "bin" / "torchrun").symlink_to(ROOT / ".venv" / "bin" / "torchrun")
    (repo / "train_pretrain.py").write_text(
        "import os, sys, time\n"
        "pidfile = os.environ['FAKE_PIDFILE']\n"
        "open(pidfile + '.tmp', 'w').write(str(os.getpid()))\n"
        "os.replace(pidfile + '.tmp', pidfile)\n"
        "time.sleep(300)\n")
    first = start(repo, FAKE_NPROC="1")
    try:
        worker = stage_pid(repo, first)
        torchrun = int(Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[1])
        first.kill()
        first.communicate(timeout=30)
        assert gone_within(worker, 30), "the training worker outlived the script"
        assert gone_within(torchrun, 30), "torchrun outlived the script"
    finally:
        stop(first)
