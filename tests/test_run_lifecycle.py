"""A run's life as a user meets it: nothing written before the config is checked, resumes that
refuse unsafe changes and record safe ones, a finished run that stays finished, Ctrl-C, a
checkpoint save that fails on a full disk, file modes, and the profiler hook."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest

from ctxjax import train
from test_train import REPO, interrupt_a_run, tiny_config

TINY_ARGS = ["--config.model.d_model=32", "--config.model.n_layers=2", "--config.model.mlp_dim=64",
             "--config.train.seq_len=64", "--config.train.log_every=1", "--config.eval.batches=1",
             "--config.eval.batch_size=8", "--config.mesh.fsdp=1", "--config.mesh.data=-1",
             "--config.train.plot=False", "--config.optim.warmup_steps=1"]


def run_cli(workdir, *args, timeout=300, **popen):
    return subprocess.run([sys.executable, "-m", "ctxjax.train", "--config=configs/tiny_cpu.py",
                           f"--workdir={workdir}", *TINY_ARGS, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, **popen)


def test_bad_config_writes_nothing(tmp_path):
    workdir = tmp_path / "never"
    with pytest.raises(ValueError, match="skyladder.kind='quadratic'"):
        train.train_and_evaluate(tiny_config(**{"skyladder.kind": "quadratic"}), str(workdir))
    assert not workdir.exists()


def test_resume_refuses_unsafe_changes_records_safe_ones_and_finished_runs_stay_finished(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(tiny_config(steps=3, **{"train.profile_steps": (2, 3)}), workdir)
    config_json = open(os.path.join(workdir, "config.json")).read()
    # the profiler hook wrote a trace of steps 2-3
    traces = [f for _, _, files in os.walk(os.path.join(workdir, "profile")) for f in files]
    assert any(f.endswith(".xplane.pb") for f in traces), traces
    # what users read is readable by others, like the rest of the workdir
    for name in ("config.json", "metrics.jsonl"):
        assert os.stat(os.path.join(workdir, name)).st_mode & 0o777 == 0o644, name

    # A change of the parameter shapes (or data order) is refused, naming the keys, and nothing changes.
    with pytest.raises(ValueError, match=r"(?s)model.n_layers: saved 2, now 3.*train.seed: saved 0, now 5.*init_from"):
        train.train_and_evaluate(tiny_config(steps=5, **{"model.n_layers": 3, "train.seed": 5}), workdir)
    assert open(os.path.join(workdir, "config.json")).read() == config_json
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]

    # Safe changes (more steps: the schedule stretches; eval cadence) resume and are recorded.
    capsys.readouterr()
    train.train_and_evaluate(tiny_config(steps=5, **{"eval.every": 4, "train.profile_steps": ()}), workdir)
    out = capsys.readouterr().out
    assert "train.steps 3 -> 5" in out and "stretched" in out
    history = [json.loads(line) for line in open(os.path.join(workdir, "config_history.jsonl"))]
    assert history[-1]["resumed_at_step"] == 3 and history[-1]["changes"]["train.steps"] == [3, 5]
    assert open(os.path.join(workdir, "config.original.json")).read() == config_json
    assert json.load(open(os.path.join(workdir, "config.json")))["train"]["steps"] == 5

    # Running a finished run again says so and changes nothing.
    lines = open(os.path.join(workdir, "metrics.jsonl")).read()
    event_files = os.listdir(os.path.join(workdir, "tensorboard"))
    final = train.train_and_evaluate(tiny_config(steps=5, **{"eval.every": 4}), workdir)
    assert "is complete" in capsys.readouterr().out and "eval_loss" in final
    assert open(os.path.join(workdir, "metrics.jsonl")).read() == lines
    assert os.listdir(os.path.join(workdir, "tensorboard")) == event_files


def test_ctrl_c_saves_and_exits(tmp_path):
    """A first Ctrl-C saves at the end of the step and exits 0 (no 'final:' line: the run is
    not finished); the rerun resumes there."""
    returncode, out, saved = interrupt_a_run(str(tmp_path / "interrupted"), signal.SIGINT)
    assert returncode == 0, out[-3000:]
    assert "Ctrl-C" in out and "checkpoint saved" in out and "final:" not in out
    assert len(saved) == 1 and saved[0] >= 2


def _small_filesystem(path: str, size: str):
    """A tmpfs of `size` at `path` (needs root and mount rights), or None."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return None
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True).returncode
    return path if ok == 0 else None


def test_a_full_disk_is_one_clear_message_and_the_last_checkpoint_survives(tmp_path):
    """Train to step 2 (a checkpoint), fill the disk, resume to step 4: the save of step 4 fails.
    The run says so in one message (what, where, how much, that step 2 is intact), exits
    non-zero and prints no traceback. Without mount rights the failure comes instead from a
    file-size limit (RLIMIT_FSIZE) in the middle of Orbax's writes: the same one message."""
    mount = _small_filesystem(str(tmp_path / "small"), "24m")
    try:
        base = mount or str(tmp_path / "plain")
        workdir = os.path.join(base, "run")
        first = run_cli(workdir, "--config.train.steps=2")
        assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
        limit = None
        if mount:  # leave ~100 KB free: less than a checkpoint
            free = shutil.disk_usage(mount).free
            with open(os.path.join(mount, "filler"), "wb") as f:
                f.write(b"\0" * max(0, free - 100_000))
        else:
            limit = lambda: (signal.signal(signal.SIGXFSZ, signal.SIG_IGN),
                             resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000)))
        second = run_cli(workdir, "--config.train.steps=4", preexec_fn=limit)
        output = second.stdout + second.stderr
        assert second.returncode != 0, output[-3000:]
        message = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(message) == 1, output[-3000:]
        assert "step 4" in message[0] and "step 2, is intact" in message[0] and "iB are free" in message[0]
        if mount:  # caught before writing: not a line more
            assert output.count("Traceback") == 0, output[-3000:]
        assert sorted(d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()) == ["2"]
    finally:
        if mount:
            subprocess.run(["umount", mount], capture_output=True)
