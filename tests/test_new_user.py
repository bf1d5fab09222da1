"""What a new user meets first: the top-level help, the progress output of a reused stage, the
labels and numbers the jobs print and plot (the demo's speed ratios in the package's convention,
"N.NNx faster" = baseline time / our time), Ctrl-C, and altmoe train's thread default.
"""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from unimoe_kernels.__main__ import main
from unimoe_kernels.jobs import demo

TRAIN = ["--preset", "micro", "--batch-size", "8", "--eval-examples", "2", "--steps", "2"]


def test_top_level_help_is_for_users(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "Start with `python -m unimoe_kernels demo`" in text and "examples:" in text
    for job in ("bench", "train", "generate", "demo", "altmoe"):
        assert re.search(rf"^\s+{job}\s+\S", text, re.M), job  # each job listed with what it does
    # Not the module docstring, which is for whoever edits the package.
    assert "add_arguments" not in text and "imports triton" not in text


@pytest.fixture(scope="module")
def stage0(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--stage", "0", "--out", str(out), *TRAIN, "--no-progress"]) == 0
    return out


def test_a_reused_stage_draws_no_progress_bar(stage0, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(stage0, out)
    capsys.readouterr()
    assert main(["train", "--stage", "0", "--out", str(out), *TRAIN]) == 0  # progress bar on
    captured = capsys.readouterr()
    assert "stage 0: reusing" in captured.out
    assert "step/s" not in captured.err and "it/s" not in captured.err, captured.err


def test_generate_on_a_model_without_moe_does_not_say_sparsemoe(stage0, capsys):
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(stage0 / "stage0"), "-n", "1", "--modality", "text"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "generated tokens/s (dense FFN, no MoE, KV cache)" in last and "SparseMoE" not in last


def _report(fused: float, naive: float) -> dict:
    """A report with distinct numbers for every speed, so a swapped or inverted one shows."""
    rates = {"train": (fused, naive), "gen": (2 * fused, 4 * naive), "stack": (3 * fused, naive / 2)}
    mk = {k: {"fused": f, "naive": n} for k, (f, n) in rates.items()}
    return {
        "stages": [{"stage": 3, "history": [1.0, 0.5], "eval": {"accuracy": 0.5, "chance": 0.25,
                                                                "per_modality": {"text": 0.5, "image": 0.5}}}],
        "accuracy_over_chance": 2.0, "device": "cpu",
        "throughput": {"train_tokens_per_s": mk["train"], "train_speedup_vs_naive": fused / naive,
                       "generate_tokens_per_s": mk["gen"], "generate_speedup_vs_naive": (2 * fused) / (4 * naive)},
        "layer_stack": {"shape": "micro", "layers": 1, "tokens": 64, "hidden": 32, "ffn": 48, "experts": 4, "top_k": 2,
                        "lora_rank": 4, "dtype": "float32", "device": "cpu", "train_tokens_per_s": mk["stack"],
                        "speedup_vs_naive": (3 * fused) / (naive / 2)},
        "expert_load": {"token_modalities": ["text"], "experts": ["text FFN"], "fraction": [[1.0]]},
    }


def test_demo_prints_each_speed_as_ours_vs_theirs_and_their_ratio():
    text = "\n".join(demo.summary_lines(_report(300.0, 100.0)))
    assert "training tokens/s: SparseMoE 300 vs naive loop 100 (SparseMoE 3.00x faster)" in text
    assert "generation tokens/s: SparseMoE 600 vs naive loop 400 (SparseMoE 1.50x faster)" in text
    assert "fwd+bwd tokens/s: SparseMoE 900 vs naive loop 50 (SparseMoE 18.00x faster)" in text
    assert "N.NNx faster = baseline time / our time" in text


def test_demo_speed_ratios_are_ours_over_the_naive_loops(monkeypatch):
    """The naive loop made slower by a sleep per call: every ratio must come out above 1, and be our
    tokens/s over the naive loop's, as measured."""
    import time

    from unimoe_kernels import baselines
    from unimoe_kernels.models.training import eval_batches
    from unimoe_kernels.models.unimoe import UniMoE, preset_config

    real = baselines.naive_loop_moe

    def slow(*a, **k):
        time.sleep(0.01)
        return real(*a, **k)

    monkeypatch.setattr(baselines, "naive_loop_moe", slow)
    torch.manual_seed(0)
    model = UniMoE(preset_config("micro"))
    model.set_ffn_mode("moe")
    thr = demo.measure_throughput(model, model.cfg, 4, 1, 1, eval_batches(model.cfg, 2))
    for kind in ("train", "generate"):
        rates = thr[f"{kind}_tokens_per_s"]
        assert thr[f"{kind}_speedup_vs_naive"] == pytest.approx(rates["fused"] / rates["naive"])
        assert thr[f"{kind}_speedup_vs_naive"] > 1, (kind, rates)
    stack = demo.measure_layer_stack("micro", torch.device("cpu"), 1)
    assert stack["speedup_vs_naive"] == pytest.approx(
        stack["train_tokens_per_s"]["fused"] / stack["train_tokens_per_s"]["naive"]) and stack["speedup_vs_naive"] > 1


def test_median_rate_is_tokens_per_second(monkeypatch):
    from types import SimpleNamespace

    def fake(fns, rounds, **_):  # 100 tokens per round in 10, 20 and 40 ms: median rate 5000 tokens/s
        return {n: SimpleNamespace(results=[100] * 3, ms=[10.0, 20.0, 40.0]) for n in fns}

    monkeypatch.setattr(demo.timing, "time_interleaved", fake)
    assert demo._median_rate({"fused": None}, 3) == {"fused": pytest.approx(5000.0)}


def test_throughput_plot_shows_its_numbers(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure
    import matplotlib.text

    texts = {}
    real = matplotlib.figure.Figure.savefig

    def savefig(fig, path, *a, **k):
        texts[str(path)] = " | ".join(t.get_text() for t in fig.findobj(matplotlib.text.Text))
        return real(fig, path, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    report = _report(300.0, 100.0)
    report["expert_load"]["counts"] = [[1]]
    demo._plots(report, str(tmp_path))
    shown = texts[str(tmp_path / "throughput.png")]
    for number in ("300", "100", "600", "400", "900", "50", "3.00x faster", "1.50x faster", "18.00x faster"):
        assert number in shown.split(" | ") or number in shown, (number, shown)


def test_ctrl_c_is_one_line_and_says_what_is_kept(monkeypatch, capsys):
    from unimoe_kernels.jobs import train

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run", interrupted)
    assert main(["train", "--stage", "0"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["python -m unimoe_kernels train: interrupted; the last checkpoint saved is kept, and the same "
                   "command resumes from it"]


def test_altmoe_train_defaults_to_one_thread(monkeypatch):
    """torch's default (one thread per core) made altmoe train ~8x slower on a busy 2-core machine."""
    from unimoe_kernels.jobs import altmoe

    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    monkeypatch.setattr(altmoe, "run_train", lambda args: None)
    assert main(["altmoe", "train"]) == 0
    assert seen == [1]
