"""A stage checkpoint is one unit: a kill at any moment of a save leaves the old complete checkpoint
or the new complete one, and the resumed run is the uninterrupted run, bit for bit; a damaged file
is found (sizes and sha256) and named in one `error:` line with the fix; a loss that stops being
finite stops training before anything non-finite is saved.

Runs use the "micro" preset, stage 0, batch 8 (a few steps take about a second on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from job_errors import error_line

from unimoe_kernels.__main__ import main
from unimoe_kernels.models import checkpoint as C
from unimoe_kernels.models import training as T
from unimoe_kernels.models.unimoe import UniMoE, preset_config

STEPS, BATCH = 4, 8
TRAIN = ["--preset", "micro", "--batch-size", "8", "--no-progress", "--eval-examples", "2", "--steps", "2"]


def _fresh():
    torch.manual_seed(0)
    return UniMoE(preset_config("micro"))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 4-step run (final weights), and a directory holding the same run stopped
    after step 2, with the weights after steps 2 and 3."""
    full = _fresh()
    T.train_stage(full, 0, STEPS, batch_size=BATCH)
    d = tmp_path_factory.mktemp("ckpt") / "stage0"
    weights = {}
    model = _fresh()

    # on_step runs before its step's save: stopped in step 3's callback, the directory holds step 2.
    def stop_at_3(step, loss):
        weights[step + 1] = _state(model)
        if step + 1 == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.train_stage(model, 0, STEPS, batch_size=BATCH, out_dir=str(d), save_every=1, on_step=stop_at_3)
    assert T.read_trainer_state(str(d))["step"] == 2
    return {"final": _state(full), "dir": d, "weights": weights, "model_at_3": model}


def _resume_to_end(d) -> dict:
    model = T.load_model(str(d))
    T.train_stage(model, 0, STEPS, batch_size=BATCH, out_dir=str(d), save_every=1)
    return _state(model)


class _Kill(BaseException):
    """Stands for SIGKILL: no `except Exception` or `except OSError` handler runs."""


# Every call that writes or moves something during a save, in the order a save makes them.
_WRITES = [("safetensors.torch", "save_file"), ("json", "dump"), ("os", "rename"), ("shutil", "rmtree")]


def _kill_at(monkeypatch, n: int) -> list:
    """Patch the save's writing calls so that the n-th of them (1-based) raises _Kill; returns the log."""
    import importlib

    log = []
    for mod_name, fn_name in _WRITES:
        mod = importlib.import_module(mod_name)
        real = getattr(mod, fn_name)

        def wrapped(*a, _real=real, _name=f"{mod_name}.{fn_name}", **k):
            log.append(_name)
            if len(log) == n:
                raise _Kill(_name)
            return _real(*a, **k)

        monkeypatch.setattr(mod, fn_name, wrapped)
    return log


def test_a_kill_anywhere_in_a_save_leaves_a_whole_checkpoint(runs, tmp_path, monkeypatch):
    """Step 3's save killed at each of its writes in turn: the directory then holds step 2 with
    step 2's weights, or step 3 with step 3's, and resuming gives the uninterrupted run's weights."""
    points = 0
    for n in range(1, 20):
        work = tmp_path / f"k{n}"
        d = work / "stage0"
        shutil.copytree(runs["dir"], d)
        log = _kill_at(monkeypatch, n)
        try:
            opt = torch.optim.AdamW(runs["model_at_3"].parameters())
            T.save_checkpoint(str(d), runs["model_at_3"], opt, stage=0, step=3, steps=STEPS, history=[0.0] * 3)
            killed = False
        except _Kill:
            killed = True
        finally:
            monkeypatch.undo()
        if not killed:
            break
        points += 1
        meta = T.read_trainer_state(str(d))
        assert meta is not None and meta["step"] in (2, 3), (log, meta)
        assert _equal(T.load_model(str(d)).state_dict(), runs["weights"][meta["step"]]), (log, meta["step"])
        if meta["step"] == 2:  # the old checkpoint: resuming it is the uninterrupted run
            assert _equal(_resume_to_end(d), runs["final"]), log
        shutil.rmtree(work)
    assert points >= 5, f"only {points} kill points: the save's writes were not all intercepted"


def test_a_real_kill_between_weights_and_optimizer_resumes_exactly(runs, tmp_path):
    """The issue's window: SIGKILL after step 3's weights are written, before its optimizer state."""
    d = tmp_path / "run" / "stage0"
    shutil.copytree(runs["dir"], d)
    script = textwrap.dedent(f"""
        import os, signal, torch
        import safetensors.torch as st
        from unimoe_kernels.models import training as T
        from unimoe_kernels.models.unimoe import UniMoE, preset_config
        real, calls = st.save_file, []
        def save_file(*a, **k):
            calls.append(1)
            real(*a, **k)
            if len(calls) == 1:  # the weights are written; the optimizer state is next
                os.kill(os.getpid(), signal.SIGKILL)
        st.save_file = save_file
        torch.manual_seed(0)
        model = T.load_model({str(d)!r})
        T.train_stage(model, 0, {STEPS}, batch_size={BATCH}, out_dir={str(d)!r}, save_every=1)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert T.read_trainer_state(str(d))["step"] == 2  # the old checkpoint, whole
    assert _equal(T.load_model(str(d)).state_dict(), runs["weights"][2])
    assert _equal(_resume_to_end(d), runs["final"])


def test_interrupted_swap_is_completed_by_the_next_reader(runs, tmp_path):
    """A kill between the two renames leaves no stage0 but a complete .stage0.new-* beside it."""
    d = tmp_path / "stage0"
    shutil.copytree(runs["dir"], d)
    os.rename(d, tmp_path / ".stage0.new-dead")
    assert T.read_trainer_state(str(d))["step"] == 2 and d.is_dir()
    assert not (tmp_path / ".stage0.new-dead").exists()


def test_a_save_that_fails_keeps_the_old_checkpoint(runs, tmp_path, monkeypatch):
    d = tmp_path / "stage0"
    shutil.copytree(runs["dir"], d)
    import safetensors.torch as st

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st, "save_file", full_disk)
    with pytest.raises(C.CheckpointError, match="No space left on device.*the checkpoint there before is kept"):
        T.save_checkpoint(str(d), runs["model_at_3"], stage=0, step=3, steps=STEPS, history=[])
    monkeypatch.undo()
    assert T.read_trainer_state(str(d))["step"] == 2 and sorted(os.listdir(tmp_path)) == ["stage0"]


# ------------------------------------------------------------------------------------------------
# Damaged files: one error line naming the file and the fix, for each way a job reads a checkpoint
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    assert main(["train", "--stage", "0", "--out", str(out), *TRAIN]) == 0
    return out



@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.safetensors", "trainer.json"])
def test_a_truncated_file_is_named_with_the_fix(finished, tmp_path, capsys, damaged):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    f = out / "stage0" / damaged
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    # Its own stage directory (resume or reuse): --fresh replaces it.
    line = error_line(capsys, ["train", "--stage", "0", "--out", str(out), *TRAIN])
    assert str(f) in line and "damaged" in line and "pass --fresh" in line
    # The checkpoint a later stage starts from: by default and through --init.
    if damaged != "optimizer.safetensors":  # a later stage reads the weights only
        line = error_line(capsys, ["train", "--stage", "1", "--out", str(out), *TRAIN])
        assert str(f) in line and "train stage 0 again" in line and "--fresh" in line
        line = error_line(capsys, ["train", "--stage", "1", "--out", str(tmp_path / "b"), "--init",
                                    str(out / "stage0"), *TRAIN])
        assert str(f) in line and "pass --init a complete stage-0 checkpoint" in line
        line = error_line(capsys, ["generate", "--ckpt", str(out / "stage0"), "-n", "1"])
        assert str(f) in line and "pass --ckpt a complete checkpoint" in line
    # --fresh does not read it and replaces it.
    assert main(["train", "--stage", "0", "--out", str(out), *TRAIN, "--fresh"]) == 0
    assert T.read_trainer_state(str(out / "stage0"))["step"] == 2


def test_init_of_another_stage_or_unfinished_is_refused(finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    meta_file = out / "stage0" / "trainer.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "stage": 3}))
    line = error_line(capsys, ["train", "--stage", "1", "--out", str(tmp_path / "b"), "--init", str(out / "stage0"),
                                *TRAIN])
    assert f"--init {out / 'stage0'} holds a stage-3 checkpoint, but stage 1 starts from a stage-0 one" in line
    meta_file.write_text(json.dumps({**meta, "step": 1}))
    line = error_line(capsys, ["train", "--stage", "1", "--out", str(out), *TRAIN])
    assert "interrupted at step 1 of 2: finish it first" in line
    # A run directory passed where a stage directory belongs: the stage directory inside is named.
    meta_file.write_text(json.dumps(meta))
    line = error_line(capsys, ["train", "--stage", "1", "--out", str(tmp_path / "b"), "--init", str(out), *TRAIN])
    assert f"it is a run directory; pass --init {out / 'stage0'}" in line
    line = error_line(capsys, ["generate", "--ckpt", str(out), "-n", "1"])
    assert "holds no checkpoint" in line and "pass --ckpt the directory of a trained stage" in line


# ------------------------------------------------------------------------------------------------
# Non-finite losses
# ------------------------------------------------------------------------------------------------


def test_a_diverging_run_stops_before_saving_non_finite_weights(tmp_path):
    d = tmp_path / "stage0"
    with pytest.raises(T.TrainingDiverged, match="lower learning rate"):
        T.train_stage(_fresh(), 0, 6, batch_size=BATCH, lr=1e30, out_dir=str(d), save_every=1)
    meta = T.read_trainer_state(str(d))
    if meta is not None:  # whatever was saved is finite
        assert all(torch.isfinite(v).all() for v in T.load_model(str(d)).state_dict().values())
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        T.train_stage(_fresh(), 0, 1, lr=float("inf"))


def test_a_diverging_job_exits_with_oneerror_line(tmp_path, capsys):
    out = tmp_path / "run"
    line = error_line(capsys, ["train", "--stage", "0", "--out", str(out), *TRAIN, "--lr", "1e30"])
    assert "stage 0: the loss is nan" in line and "lower learning rate" in line
    assert T.read_trainer_state(str(out / "stage0")) is None


def test_resuming_without_optimizer_state_says_so(runs, tmp_path):
    d = tmp_path / "stage0"
    shutil.copytree(runs["dir"], d)
    os.remove(d / "optimizer.safetensors")  # by hand: a save always writes it
    with pytest.warns(UserWarning, match="optimizer.safetensors is missing: resuming with fresh AdamW moments"):
        T.train_stage(T.load_model(str(d)), 0, STEPS, batch_size=BATCH, out_dir=str(d))
