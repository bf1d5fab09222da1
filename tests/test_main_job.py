"""The main job end to end at tiny shapes: bench's table, the run-directory rule of train and demo
(a stage directory is reused only by a request with the same settings, and says so; anything else
stops with one `error:` line naming the difference and --fresh), and the CLI's error convention
(one `<prog>: error: ...` line on stderr, exit status 2) and help (every option, its default).

Training runs use the "micro" preset with 2-step stages and batch 8 (about a second each on 2 cores).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from unimoe_kernels.__main__ import build_parser, main

HAS_CUDA = torch.cuda.is_available()


def test_bench_job_tiny(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--tokens", "32", "--hidden", "16", "--ffn", "24", "--experts", "4", "--top-k", "2",
            "--lora-rank", "2", "--rounds", "2", "--device", "cpu", "--json", str(out)]
    assert main(args) == 0
    table = capsys.readouterr().out
    for provider in ("unimoe", "naive_loop", "dense_chain"):
        assert provider in table
    # The package's speed convention, said in the table's header.
    assert "N.NNx faster = baseline median time / this provider's median time" in table
    assert "faster than dense" in table and "faster than naive" in table
    result = json.loads(out.read_text())
    assert result["flops_fwd_bwd"] > 0
    assert {r["provider"] for r in result["rows"]} == {"unimoe", "naive_loop", "dense_chain"}
    assert all(r["median_ms"] > 0 for r in result["rows"])
    rows = {r["provider"]: r for r in result["rows"]}
    for r in rows.values():  # baseline time / this time
        assert r["faster_than_naive_loop"] == pytest.approx(rows["naive_loop"]["median_ms"] / r["median_ms"])
        assert r["faster_than_dense"] == pytest.approx(rows["dense_chain"]["median_ms"] / r["median_ms"])


# ------------------------------------------------------------------------------------------------
# Run directories
# ------------------------------------------------------------------------------------------------

TRAIN = ["--preset", "micro", "--batch-size", "8", "--no-progress", "--eval-examples", "2"]


def _train(out, stage=0, *extra):
    return main(["train", "--stage", str(stage), "--steps", "2", "--out", str(out), *TRAIN, *extra])


def _meta(out, stage=0):
    return json.loads((out / f"stage{stage}" / "trainer.json").read_text())


def _usage_error(capsys, argv) -> str:
    """The one stderr line of a command-line error (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2, err
    assert len(err) == 1 and "error: " in err[0] and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture(scope="module")
def stage0(tmp_path_factory):
    """A run directory holding a finished 2-step micro stage 0 (copied per test before changes)."""
    out = tmp_path_factory.mktemp("run")
    assert _train(out) == 0
    return out


def test_finished_stage_is_reused_and_says_so(stage0, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(stage0, out)
    before = (out / "stage0" / "trainer.json").read_bytes()
    capsys.readouterr()
    assert _train(out) == 0
    assert "stage 0: reusing" in capsys.readouterr().out
    assert (out / "stage0" / "trainer.json").read_bytes() == before  # nothing trained, nothing rewritten


@pytest.mark.parametrize("flags,difference", [
    (["--steps", "1"], "steps: 2 there, 1 asked for"),  # fewer steps: a finished stage is not rewritten
    (["--steps", "3"], "steps: 2 there, 3 asked for"),  # more steps: another cosine schedule
    (["--seed", "1"], "seed: 0 there, 1 asked for"),
    (["--batch-size", "4"], "batch_size: 8 there, 4 asked for"),
    (["--lr", "0.01"], "lr: 0.003 there, 0.01 asked for"),
    (["--preset", "demo"], "preset: 'micro' there, 'demo' asked for"),
    (["--freeze-encoders"], "freeze_encoders: False there, True asked for"),
])
def test_other_settings_stop_the_job(stage0, capsys, flags, difference):
    before = (stage0 / "stage0" / "trainer.json").read_bytes()
    # --steps last wins in argparse, so the case's flags override _train's.
    line = _usage_error(capsys, ["train", "--stage", "0", "--steps", "2", "--out", str(stage0), *TRAIN, *flags])
    assert difference in line and "--fresh" in line and str(stage0 / "stage0") in line
    assert (stage0 / "stage0" / "trainer.json").read_bytes() == before


def test_other_package_version_or_data_stops_the_job(stage0, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("unimoe_kernels.jobs.train.__version__", "999.0")
    line = _usage_error(capsys, ["train", "--stage", "0", "--steps", "2", "--out", str(stage0), *TRAIN])
    assert "version: '0.1.0' there, '999.0' asked for" in line
    monkeypatch.undo()
    out = tmp_path / "run"
    shutil.copytree(stage0, out)
    meta = _meta(out)
    meta["settings"]["data"]["noise"] = 0.5  # as if written with other synthetic-data settings
    (out / "stage0" / "trainer.json").write_text(json.dumps(meta))
    assert "data: {" in _usage_error(capsys, ["train", "--stage", "0", "--steps", "2", "--out", str(out), *TRAIN])


def test_checkpoint_without_settings_stops_the_job(stage0, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(stage0, out)
    meta = _meta(out)
    del meta["settings"]  # as an older version of the package wrote it
    (out / "stage0" / "trainer.json").write_text(json.dumps(meta))
    line = _usage_error(capsys, ["train", "--stage", "0", "--steps", "2", "--out", str(out), *TRAIN])
    assert "older version" in line and "--fresh" in line


def test_fresh_trains_again_with_the_new_settings(stage0, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(stage0, out)
    old = _meta(out)
    assert main(["train", "--stage", "0", "--steps", "3", "--out", str(out), *TRAIN, "--fresh"]) == 0
    meta = _meta(out)
    assert meta["step"] == 3 and len(meta["history"]) == 3 and meta["settings"]["steps"] == 3
    assert meta["run_id"] != old["run_id"]


def test_stage_made_from_another_run_of_the_previous_stage_stops(stage0, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(stage0, out)
    assert _train(out, 1) == 0
    assert _meta(out, 1)["settings"]["init"] == _meta(out, 0)["run_id"]
    assert _train(out, 0, "--fresh") == 0  # same settings, but a new run of stage 0
    line = _usage_error(capsys, ["train", "--stage", "1", "--steps", "2", "--out", str(out), *TRAIN])
    assert line.count("init: ") == 1 and "--fresh" in line


def test_train_stage_never_rewrites_a_finished_stage_to_fewer_steps(stage0):
    from unimoe_kernels.models import training as T

    d = str(stage0 / "stage0")
    before = open(os.path.join(d, "trainer.json")).read()
    with pytest.raises(ValueError, match="2-step run"):
        T.train_stage(T.load_model(d), 0, 1, batch_size=8, out_dir=d)
    assert open(os.path.join(d, "trainer.json")).read() == before


DEMO = ["--preset", "micro", "--batch-size", "8", "--eval-examples", "2", "--bench-rounds", "1", "--bench-steps", "1",
        "--no-progress", "--no-plots", "--stack", "none"]


def test_demo_reuses_only_its_own_run(tmp_path, capsys):
    out = tmp_path / "demo"
    run = ["demo", "--out", str(out), *DEMO]
    assert main([*run, "--steps-scale", "0.01"]) == 0  # 3, 3, 2, 2 steps
    first = {s: (out / f"stage{s}" / "trainer.json").read_bytes() for s in range(4)}
    report = json.loads((out / "report.json").read_text())
    assert "N.NNx faster = baseline time / our time" in report["speed_convention"]
    text = capsys.readouterr().out
    assert "SparseMoE" in text and "x faster)" in text and "N.NNx faster = baseline time / our time" in text

    # The same request again: every stage reused, announced, nothing rewritten, the same results.
    assert main([*run, "--steps-scale", "0.01"]) == 0
    text = capsys.readouterr().out
    assert all(f"stage {s}: reusing {out / f'stage{s}'}" in text for s in range(4))
    assert all((out / f"stage{s}" / "trainer.json").read_bytes() == first[s] for s in range(4))
    again = json.loads((out / "report.json").read_text())
    assert [s["eval"] for s in again["stages"]] == [s["eval"] for s in report["stages"]]
    assert [s["reused_from_step"] for s in again["stages"]] == [s["steps"] for s in report["stages"]]

    # Another request into the same directory stops before training anything.
    line = _usage_error(capsys, [*run, "--steps-scale", "0.007"])  # 2 steps for stage 0
    assert "steps: 3 there, 2 asked for" in line and "--fresh" in line
    line = _usage_error(capsys, ["demo", "--out", str(out), *DEMO, "--steps-scale", "0.01", "--preset", "demo"])
    assert "preset: 'micro' there, 'demo' asked for" in line
    # A later stage holding another run stops the demo before the stages before it train.
    shutil.rmtree(out / "stage0")
    meta = json.loads((out / "stage2" / "trainer.json").read_text())
    meta["settings"]["seed"] = 7
    (out / "stage2" / "trainer.json").write_text(json.dumps(meta))
    first[2] = (out / "stage2" / "trainer.json").read_bytes()
    line = _usage_error(capsys, [*run, "--steps-scale", "0.01"])
    assert "stage2 holds another run of stage 2 (seed: 7 there, 0 asked for)" in line
    assert not (out / "stage0").exists()
    assert all((out / f"stage{s}" / "trainer.json").read_bytes() == first[s] for s in range(1, 4))


# ------------------------------------------------------------------------------------------------
# CLI: errors and help
# ------------------------------------------------------------------------------------------------

ERRORS = [
    (["bench", "--tokens", "0"], "bench: error: argument --tokens: must be an integer >= 1, got '0'"),
    (["bench", "--rounds", "-1"], "argument --rounds: must be an integer >= 1"),
    (["bench", "--top-k", "9", "--experts", "8"], "--top-k 9 is more than --experts 8"),
    (["bench", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    (["bench", "--device", "tpu"], "--device must be auto, cpu or cuda[:index], got 'tpu'"),
    (["bench", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["train"], "the following arguments are required: --stage"),
    (["train", "--stage", "0", "--steps", "0"], "argument --steps: must be an integer >= 1"),
    (["train", "--stage", "1", "--out", "{tmp}"], "stage 1 starts from a stage-0 checkpoint"),
    (["train", "--stage", "0", "--lr", "nan"], "argument --lr: must be a finite number > 0"),
    (["train", "--stage", "0", "--lr", "inf"], "argument --lr: must be a finite number > 0, got 'inf'"),
    (["train", "--stage", "0", "--lr=-1e-3"], "argument --lr: must be a finite number > 0"),
    (["train", "--stage", "1", "--init", "/nonexistent", "--out", "{tmp}"],
     "--init /nonexistent does not exist: pass --init the directory of a trained stage 0"),
    (["demo", "--steps-scale", "0"], "argument --steps-scale: must be a finite number > 0, got '0'"),
    (["demo", "--steps-scale", "inf"], "argument --steps-scale: must be a finite number > 0, got 'inf'"),
    (["demo", "--threads", "-1"], "argument --threads: must be an integer >= 0"),
    (["demo", "--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["generate", "--out", "{tmp}"], "holds no checkpoint"),
    (["generate", "--ckpt", "/nonexistent"], "--ckpt /nonexistent does not exist: pass --ckpt the directory of a"),
    (["generate", "--modality", "smell"], "argument --modality: invalid choice: 'smell'"),
    (["generate", "-n", "0"], "argument -n/--num: must be an integer >= 1"),
    (["altmoe"], "altmoe: error: choose train or retrieve"),
    (["altmoe", "train", "--lr", "inf"], "argument --lr: must be a finite number > 0, got 'inf'"),
    (["altmoe", "train", "--direction-lr", "image_to_text=nan"], "--direction-lr image_to_text: must be a finite"),
    (["altmoe", "train", "--direction-lr=image_to_text=-1"], "--direction-lr image_to_text: must be a finite"),
    (["altmoe", "train", "--warmup-frac", "2"], "argument --warmup-frac: must be a number from 0 to 1, got '2'"),
    (["altmoe", "train", "--noise", "inf"], "argument --noise: must be a finite number >= 0, got 'inf'"),
    (["altmoe", "train", "--dims", "image"], "argument --dims: --dims must look like 'image=64,text=48'"),
    (["altmoe", "train", "--top-k", "13"], "--top-k 13 is more than --experts 12"),
    (["altmoe", "retrieve", "--run", "{tmp}"], "checkpoint.pt' does not exist"),
    (["frobnicate"], "argument job: invalid choice: 'frobnicate'"),
    ([], "error: choose a job: bench, train, generate, demo, altmoe"),
]
if not HAS_CUDA:
    ERRORS += [
        (["bench", "--device", "cuda"], "--device cuda: torch sees no CUDA device here"),
        (["demo", "--stack-device", "cuda", "--out", "{tmp}"], "--stack-device cuda: torch sees no CUDA device here"),
        (["altmoe", "train", "--device", "cuda", "--out", "{tmp}"], "--device cuda: torch sees no CUDA device"),
    ]


@pytest.mark.parametrize("argv,message", ERRORS, ids=[" ".join(a) for a, _ in ERRORS])
def test_bad_values_print_one_error_line_and_exit_2(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path / "empty")) for a in argv]
    line = _usage_error(capsys, argv)
    assert line.startswith("python -m unimoe_kernels") and message in line, line
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").iterdir())


def test_error_by_subprocess_has_no_traceback():
    done = subprocess.run([sys.executable, "-m", "unimoe_kernels", "bench", "--tokens", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == ["python -m unimoe_kernels bench: error: argument --tokens: must be an "
                                        "integer >= 1, got '0'"]


def _parsers(parser: argparse.ArgumentParser, name: str = ""):
    yield name or parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}".strip())


def test_every_option_has_help_and_shows_its_default():
    parser, _ = build_parser()
    seen = 0
    for name, p in _parsers(parser):
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            flag = "/".join(action.option_strings) or action.dest
            assert action.help, f"{name} {flag} has no help text"
            seen += 1
            if not action.required:
                assert "(default: " in p._get_formatter()._get_help_string(action), f"{name} {flag}"
        p.format_help()  # and the help renders
    assert seen > 60  # every subcommand's options were walked
