"""A run directory is held by one live run: a second one stops at once with one line naming the
first one's pid, a dead run's lock is taken over, and an --out that cannot be written is found
before any training (with one line naming it), not at the first save.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from job_errors import error_line

from unimoe_kernels.__main__ import main
from unimoe_kernels.jobs import LOCK_NAME, run_directory

TRAIN = ["--preset", "micro", "--batch-size", "8", "--no-progress", "--eval-examples", "2", "--steps", "2"]



def test_a_second_live_run_is_refused_naming_the_first(tmp_path, capsys):
    out = tmp_path / "run"
    with run_directory(str(out)):
        for argv in (["train", "--stage", "0", "--out", str(out), *TRAIN],
                     ["demo", "--out", str(out), "--preset", "micro", "--no-progress"],
                     ["altmoe", "train", "--out", str(out), "--no-progress"]):
            line = error_line(capsys, argv)
            assert f"{out} is in use by another live run, pid {os.getpid()}" in line and "--out" in line, line
        assert os.listdir(out) == [LOCK_NAME]  # nothing trained or written by the refused runs
    assert main(["train", "--stage", "0", "--out", str(out), *TRAIN]) == 0  # released: the next run goes ahead
    assert (out / LOCK_NAME).read_text() == ""


def test_a_dead_runs_lock_is_taken_over(tmp_path, capsys):
    """A process holding the lock is refused while alive; SIGKILLed (no cleanup), its lock is taken over."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from unimoe_kernels.jobs import run_directory
        with run_directory({str(out)!r}):
            print("held", flush=True)
            time.sleep(300)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = error_line(capsys, ["train", "--stage", "0", "--out", str(out), *TRAIN])
        assert f"pid {holder.pid} (" in line
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid  # left behind by the kill
    capsys.readouterr()
    assert main(["train", "--stage", "0", "--out", str(out), *TRAIN]) == 0
    assert f"taking over the lock of pid {holder.pid}" in capsys.readouterr().out


@pytest.mark.parametrize("job", [
    ["demo", "--preset", "micro", "--no-progress"],
    ["train", "--stage", "0", *TRAIN, "--save-every", "0"],
    ["altmoe", "train", "--no-progress"],
])
def test_an_unwritable_out_stops_the_job_before_training(tmp_path, capsys, job):
    regular = tmp_path / "a_file"
    regular.write_text("mine")
    for out, says in ((regular, "is a file, not a directory"), (regular / "below", "Not a directory"),
                      ("/proc/unimoe_out", "cannot write there")):
        line = error_line(capsys, [*job, "--out", str(out)])
        assert f"--out {out}" in line and says in line, line
    assert regular.read_text() == "mine"
