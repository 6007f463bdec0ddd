"""train_pretrain.py and trainer.py: what a user relies on when training runs for days. Training
lowers the validation loss; torchrun with 2 ranks computes the losses of 1 rank with 2 micro-steps;
resuming (after a plain stop, SIGTERM or kill -9, past corrupted and half-written checkpoints)
repeats the uninterrupted run bit for bit; bad configs and runs stop with one line.

Every run trains a 2-layer, 32-wide model on shards prepared once from a slice of the bundled corpus.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import train_pretrain
import trainer
from conftest import assert_same_state
from errors import NanozhError
from model import ModelConfig, Transformer, load_model
from train_pretrain import PretrainConfig

ROOT = Path(__file__).resolve().parent.parent
STEPS = 12
TINY = ["--config", str(ROOT / "configs" / "tiny.json"), "--model.n_layer=2", "--model.n_embd=32",
        "--model.n_head=2", "--model.n_kv_head=1", "--model.block_size=64", "--batch_size=2", "--grad_accum=2",
        f"--max_steps={STEPS}", "--lr=1e-2", "--warmup_steps=3", "--log_every=1", "--eval_every=6",
        "--save_every=4", "--keep_last=3", "--eval_tokens=1024", "--device=cpu", "--dtype=float32"]


@pytest.fixture(scope="session")
def shards(pretrain_shards) -> Path:
    """A pretraining shard directory from the first documents of each bundled corpus file (conftest)."""
    return pretrain_shards


@pytest.fixture(autouse=True)
def one_thread_and_own_signal_handlers():
    """Runs here use one thread, like the subprocesses (THREADS): on a busy 2-core machine a
    second thread spin-waits and makes a step several times slower, and runs compared bit for bit
    must split their matmuls the same way. Training in this process installs SIGINT/SIGTERM
    handlers; pytest gets its own back."""
    threads, saved = torch.get_num_threads(), {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for s, handler in saved.items():
        signal.signal(s, handler)


def train(shards: Path, out_dir: Path, *flags: str) -> None:
    """A run in this process (no torch import to wait for)."""
    train_pretrain.train(trainer.parse_config(PretrainConfig, [*TINY, f"--data={shards}", f"--out_dir={out_dir}", *flags]))


THREADS = {**os.environ, "OMP_NUM_THREADS": "1"}


def command(shards: Path, out_dir: Path, *flags: str) -> list[str]:
    return [sys.executable, str(ROOT / "train_pretrain.py"), *TINY, f"--data={shards}", f"--out_dir={out_dir}", *flags]


def start(shards: Path, out_dir: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(command(shards, out_dir, *flags), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=THREADS)


def metrics(out_dir: Path) -> list[dict]:
    """metrics.jsonl's records; while a run is writing it the last line may not be complete yet."""
    path = out_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


def losses(out_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(out_dir) if "loss" in m}


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"training exited early: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "timed out waiting for training"
        time.sleep(0.02)


def copy_checkpoint(run: Path, step: int, out_dir: Path) -> Path:
    """A fresh out_dir holding only run's checkpoint at `step`: a run that stopped there."""
    out_dir.mkdir()
    shutil.copytree(run / f"step_{step:07d}", out_dir / f"step_{step:07d}")
    (out_dir / "latest").symlink_to(f"step_{step:07d}")
    return out_dir


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory) -> Path:
    """The reference: STEPS steps, never interrupted, checkpoints every 4 steps."""
    out_dir = tmp_path_factory.mktemp("straight") / "run"
    train(shards, out_dir)
    return out_dir

# -----------------------------------------------------------------------------
# training itself


def test_training_lowers_validation_loss(shards, tmp_path):
    train(shards, tmp_path / "run", "--max_steps=60", "--eval_every=60", "--save_every=60", "--log_every=60")
    val = [m["val_loss"] for m in metrics(tmp_path / "run") if "val_loss" in m]
    assert len(val) == 2 and val[1] < val[0] - 1.5, val


def test_eval_every_zero_never_evaluates(shards, tmp_path):
    train(shards, tmp_path / "run", "--max_steps=2", "--eval_every=0")
    assert [m for m in metrics(tmp_path / "run") if "val_loss" in m] == []
    assert sorted(losses(tmp_path / "run")) == [1, 2]


def test_run_writes_checkpoints_metrics_and_latest_model_dir(straight):
    assert sorted(losses(straight)) == list(range(1, STEPS + 1))
    assert [m["step"] for m in metrics(straight) if "val_loss" in m] == [0, 6, 12]
    assert all({"lr", "grad_norm", "tok_s"} <= m.keys() for m in metrics(straight) if "loss" in m)
    assert sorted(p.name for p in straight.glob("step_*")) == ["step_0000004", "step_0000008", "step_0000012"]
    assert os.readlink(straight / "latest") == "step_0000012"  # relative: the run dir can move
    for name in ("model.safetensors", "config.json", "tokenizer.model", "train_config.json", "train_state.pt"):
        assert (straight / "latest" / name).is_file()
    assert json.loads((straight / "latest" / "train_config.json").read_text())["max_steps"] == STEPS
    assert load_model(straight / "latest").config.n_layer == 2


def torchrun(cmd: list[str]) -> list[str]:
    """The same training command under torchrun with 2 CPU ranks (gloo)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *cmd[1:]]


@pytest.fixture(scope="module")
def ddp_straight(shards, tmp_path_factory) -> Path:
    """The straight run on 2 torchrun ranks with 1 micro-step each (the same global batch)."""
    out_dir = tmp_path_factory.mktemp("ddp") / "run"
    result = subprocess.run(torchrun(command(shards, out_dir, "--grad_accum=1")), capture_output=True, text=True,
                            timeout=300, cwd=ROOT, env=THREADS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("step 1 | loss") == 1  # only rank 0 logs
    return out_dir


def test_torchrun_two_ranks_match_one_rank_with_two_micro_steps(straight, ddp_straight):
    assert len([m for m in metrics(ddp_straight) if "loss" in m]) == STEPS
    ddp, single = losses(ddp_straight), losses(straight)
    assert sorted(ddp) == sorted(single)
    assert max(abs(ddp[s] - single[s]) for s in single) < 1e-5, (ddp, single)


LEAVE_GROUP = '''
import glob, sys
sys.path.insert(0, sys.argv[1])
import train_pretrain
import trainer
leave = trainer.cleanup_distributed
def leave_and_check(wait=False):
    leave(wait)
    threads = [open(f).read().strip() for f in glob.glob("/proc/self/task/*/comm")]
    assert not any("gloo" in t for t in threads), f"gloo threads still running: {threads}"
    print("left the group")
trainer.cleanup_distributed = leave_and_check
sys.argv = sys.argv[:1] + sys.argv[2:]
train_pretrain.main()
'''


def test_leaving_the_process_group_tears_gloo_down_once_ddp_is_gone(shards, tmp_path):
    """A 2-rank run leaves the process group after its DDP model is freed, so that leaving drops
    the group's last reference and gloo's threads stop then. Were the DDP reducer to drop it
    instead, it would join those threads holding the GIL, which a gloo thread freeing a finished
    collective's tensors may be waiting for: a rank was seen hung there after its last step, one
    run in about 25. (Thread names come from Linux's /proc, as on every machine that runs these
    tests.)"""
    script = tmp_path / "leave_group.py"
    script.write_text(LEAVE_GROUP)
    result = subprocess.run(torchrun(["python", str(script), str(ROOT), *command(shards, tmp_path / "run", "--max_steps=2")[2:]]),
                            capture_output=True, text=True, timeout=300, cwd=ROOT, env=THREADS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("left the group") == 2, result.stdout[-3000:]

# -----------------------------------------------------------------------------
# resume: the same losses, bit for bit, however the run was interrupted


def test_resume_is_bit_exact(shards, straight, tmp_path):
    out_dir = copy_checkpoint(straight, 8, tmp_path / "run")
    train(shards, out_dir, "--resume")
    assert losses(out_dir) == {s: v for s, v in losses(straight).items() if s > 8}
    assert_same_state(out_dir / "latest", straight / "latest")  # weights and optimizer, not only losses


def test_kill_between_rename_and_latest_resumes_and_points_latest(shards, straight, tmp_path):
    """The final checkpoint renamed into place, `latest` not yet updated: the rerun has nothing
    left to train, and must still leave `latest` at that checkpoint for the next stage."""
    out_dir = copy_checkpoint(straight, 8, tmp_path / "run")
    shutil.copytree(straight / "step_0000012", out_dir / "step_0000012")
    train(shards, out_dir, "--resume")
    assert os.readlink(out_dir / "latest") == "step_0000012"
    (out_dir / "latest").unlink()
    train(shards, out_dir, "--resume")
    assert os.readlink(out_dir / "latest") == "step_0000012"


def test_sigterm_saves_and_resume_is_bit_exact(shards, straight, tmp_path):
    out_dir = tmp_path / "run"
    proc = start(shards, out_dir, "--save_every=1000")
    wait_for(lambda: len(losses(out_dir)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    stopped = [int(p.name[5:]) for p in out_dir.glob("step_*")]
    assert len(stopped) == 1 and stopped[0] < STEPS
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "lo')  # a line a kill cut short
    train(shards, out_dir, "--resume")
    assert losses(out_dir) == losses(straight)
    assert_same_state(out_dir / "latest", straight / "latest")


def test_sigterm_under_two_torchrun_ranks_saves_and_resume_is_bit_exact(shards, ddp_straight, tmp_path):
    """SIGTERM reaches torchrun, which passes it to both ranks; they agree to stop after the same
    step, rank 0 saves, both exit 0; resuming on 2 ranks repeats the uninterrupted 2-rank run."""
    out_dir = tmp_path / "run"
    proc = subprocess.Popen(torchrun(command(shards, out_dir, "--grad_accum=1", "--save_every=1000")),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=THREADS)
    wait_for(lambda: len(losses(out_dir)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    # torchrun itself reports the signal it got (SignalException, exit 1) once its workers have
    # saved and exited; a worker that failed would show as ChildFailedError instead
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 0 or ("SignalException" in stderr and "ChildFailedError" not in stderr), stderr[-3000:]
    stopped = [int(p.name[5:]) for p in out_dir.glob("step_*")]
    assert len(stopped) == 1 and 3 <= stopped[0] < STEPS
    result = subprocess.run(torchrun(command(shards, out_dir, "--grad_accum=1", "--resume")), capture_output=True,
                            text=True, timeout=300, cwd=ROOT, env=THREADS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(out_dir) == losses(ddp_straight)
    assert_same_state(out_dir / "latest", ddp_straight / "latest")


def test_kill9_at_any_moment_leaves_a_resumable_run(shards, straight, tmp_path):
    """Saving every step makes it likely the kill lands mid-save; whatever it hits, every
    checkpoint directory is whole and resuming repeats the straight run."""
    out_dir = tmp_path / "run"
    proc = start(shards, out_dir, "--save_every=1", "--keep_last=2")
    wait_for(lambda: (out_dir / "step_0000003").exists(), proc)
    proc.kill()
    proc.wait()
    for ckpt in out_dir.glob("step_*"):
        load_model(ckpt)
        torch.load(ckpt / "train_state.pt", weights_only=True)
    train(shards, out_dir, "--resume")
    assert losses(out_dir) == losses(straight)
    assert not list(out_dir.glob(".tmp*"))
    assert_same_state(out_dir / "latest", straight / "latest")
    # the resumed run saves every 4 steps and keeps 3: the killed run's checkpoints are pruned as
    # older ones, and nothing half-deleted is left
    assert sorted(p.name for p in out_dir.iterdir() if p.name.startswith(("step_", ".old"))) == \
        ["step_0000004", "step_0000008", "step_0000012"]


def test_resume_skips_corrupted_checkpoint_and_half_written_dir(shards, straight, tmp_path, capsys):
    out_dir = copy_checkpoint(straight, 4, tmp_path / "run")
    shutil.copytree(straight / "step_0000008", out_dir / "step_0000008")
    with open(out_dir / "step_0000008" / "train_state.pt", "r+b") as f:
        f.truncate(1000)
    half = out_dir / ".tmp_step_0000012"  # what kill -9 in the middle of a save leaves behind
    shutil.copytree(straight / "step_0000012", half)
    (half / "train_state.pt").unlink()
    train(shards, out_dir, "--resume")
    out = capsys.readouterr()
    assert f"nanozh: {out_dir / 'step_0000008' / 'train_state.pt'}: unreadable" in out.err
    assert f"resumed from {out_dir / 'step_0000004'}" in out.out
    assert losses(out_dir) == {s: v for s, v in losses(straight).items() if s > 4}

# -----------------------------------------------------------------------------
# what bad input gets: one line, and nothing lost


def test_nan_loss_stops_with_one_line_and_keeps_the_checkpoint(shards, straight, tmp_path):
    out_dir = copy_checkpoint(straight, 8, tmp_path / "run")
    result = subprocess.run(command(shards, out_dir, "--resume", "--lr=1e30"),  # the weights blow up after one step
                            capture_output=True, text=True, timeout=120, cwd=ROOT, env=THREADS)
    assert result.returncode == 1
    last_line = result.stderr.rstrip("\n").split("\n")[-1]  # after the progress bar's last state, not before it
    assert re.match(r"^nanozh: .*: (loss|gradient norm) is (nan|inf).* at step (9|10); stopped before updating", last_line), \
        result.stderr[-2000:]
    assert sorted(p.name for p in out_dir.glob("step_*")) == ["step_0000008"]
    assert load_model(out_dir / "latest").config.n_layer == 2


def test_resume_with_another_model_is_an_error(shards, straight, tmp_path):
    out_dir = copy_checkpoint(straight, 8, tmp_path / "run")
    with pytest.raises(NanozhError) as e:
        train(shards, out_dir, "--resume", "--model.n_layer=3")
    assert str(e.value).startswith(f"nanozh: {out_dir / 'step_0000008' / 'config.json'}: ")
    assert "n_layer 2 != 3" in str(e.value)


def test_fresh_run_into_a_directory_of_checkpoints_is_an_error(shards, straight, tmp_path):
    out_dir = copy_checkpoint(straight, 8, tmp_path / "run")
    with pytest.raises(NanozhError, match="already holds checkpoints .add --resume"):
        train(shards, out_dir)


def test_init_from_starts_from_the_model_and_rejects_other_settings(shards, straight, tmp_path):
    train(shards, tmp_path / "run", f"--init_from={straight / 'latest'}", "--max_steps=1", "--model.attn_impl=naive")
    assert losses(tmp_path / "run")[1] < losses(straight)[1] - 0.5  # not a random start
    with pytest.raises(NanozhError, match=r"step_0000012/config.json: the checkpoint's model differs .*n_embd 32 != 64"):
        train(shards, tmp_path / "other", f"--init_from={straight / 'step_0000012'}", "--model.n_embd=64")


def test_bad_flag_prints_one_line_and_exits_1(shards, tmp_path):
    result = subprocess.run(command(shards, tmp_path / "run", "--max_step=5"), capture_output=True, text=True,
                            timeout=120, cwd=ROOT, env=THREADS)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "nanozh: command line: unknown config key '--max_step' (did you mean --max_steps?)\n"


def _tiny_model_and_optimizer(ckpt: Path):
    model = Transformer(ModelConfig.from_dict(json.loads((ckpt / "config.json").read_text())))
    cfg = PretrainConfig()
    optimizer = trainer.make_optimizer(model, cfg, torch.device("cpu"))
    return model, optimizer, trainer.grad_scaler(torch.device("cpu"), torch.float32)


def test_resume_with_another_tokenizer_is_an_error(shards, straight, tmp_path):
    out_dir = copy_checkpoint(straight, 8, tmp_path / "run")
    other = tmp_path / "other.model"
    other.write_bytes(b"not the same tokenizer")
    with pytest.raises(NanozhError, match=r"step_0000008/tokenizer.model: the model was trained with a different tokenizer"):
        trainer.resume(str(out_dir), *_tiny_model_and_optimizer(out_dir / "step_0000008"), other, trainer.Dist())


def test_resume_with_only_corrupted_checkpoints_is_an_error(shards, straight, tmp_path):
    out_dir = copy_checkpoint(straight, 8, tmp_path / "run")
    (out_dir / "step_0000008" / "model.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(NanozhError, match="no readable checkpoint"):
        trainer.resume(str(out_dir), *_tiny_model_and_optimizer(out_dir / "step_0000008"), shards / "tokenizer.model",
                       trainer.Dist())

# -----------------------------------------------------------------------------
# the pieces in trainer.py


def test_config_precedence_is_defaults_then_file_then_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 1e-3, "batch_size": 7, "model": {"n_layer": 3, "rope_theta": 500}}))
    cfg = trainer.parse_config(PretrainConfig, ["--config", str(path), "--batch_size=9", "--model.n_layer", "5",
                                                "--compile", "--data", "d", "--model.tie_embeddings=false"])
    assert (cfg.lr, cfg.batch_size, cfg.compile, cfg.data, cfg.warmup_steps) == (1e-3, 9, True, "d", 100)
    assert cfg.model == {"n_layer": 5, "rope_theta": 500.0, "tie_embeddings": False}
    assert isinstance(cfg.model["rope_theta"], float)


@pytest.mark.parametrize("argv, message", [
    (["--lr=fast"], "nanozh: command line: --lr='fast' is not a valid float"),
    (["--model.n_layers=4"], "nanozh: command line: unknown config key '--model.n_layers' (did you mean --model.n_layer?)"),
    (["data"], "nanozh: command line: unexpected argument 'data' (flags are --key=value)"),
    (["--lr", "--resume"], "nanozh: command line: --lr needs a value (--lr=VALUE)"),
])
def test_bad_flags_are_one_line_errors(argv, message):
    with pytest.raises(NanozhError) as e:
        trainer.parse_config(PretrainConfig, argv)
    assert str(e.value) == message


def test_unknown_key_in_config_file_names_the_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": {"n_layer": 2}, "max_step": 5}))
    with pytest.raises(NanozhError) as e:
        trainer.parse_config(PretrainConfig, [f"--config={path}"])
    assert str(e.value) == f"nanozh: {path}: unknown config key 'max_step' (did you mean max_steps?)"


def test_lr_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    @dataclass
    class C:
        lr: float = 1.0
        min_lr: float = 0.1
        warmup_steps: int = 10
        max_steps: int = 110
    lrs = [trainer.lr_at(s, C()) for s in range(120)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == 1.0 and lrs[60] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and min(lrs) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices():
    model = Transformer(ModelConfig(vocab_size=100, n_layer=1, n_embd=32, n_head=2, n_kv_head=2))
    decay, no_decay = trainer.make_optimizer(model, PretrainConfig(), torch.device("cpu")).param_groups
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
