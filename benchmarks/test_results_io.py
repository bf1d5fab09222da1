"""The results plumbing without a GPU: summary table, JSON writer, markdown/PNG renderer.

The records here are synthetic (made-up times for a device called "test-device"), written only to
pytest's tmp_path, never to benchmarks/results/.
"""

import json

import torch

from . import render_results, results
from .harness import Record


def _records():
    shape = {"T": 8, "H": 16, "F": 8, "E": 4, "k": 2}
    return [
        Record("layer", "mixtral", "tiny", "fwd+bwd", "dense", ms=1.0, tflops=2.0, vs_dense=1.0, shape=shape),
        Record("layer", "mixtral", "tiny", "fwd+bwd", "naive_loop", ms=8.0, tflops=0.25, vs_dense=0.125, shape=shape),
        Record("layer", "mixtral", "tiny", "fwd+bwd", "scattermoe", skipped="scattermoe is not importable here",
               shape=shape),
        Record("layer", "mixtral", "tiny", "fwd+bwd", "ours", ms=2.0, tflops=1.0, vs_dense=0.5, peak_mem_mb=3.5,
               shape=shape),
        Record("permute", "mixtral", "tiny", "fwd", "index_select", ms=0.5, gbps=10.0, shape=shape),
        Record("permute", "mixtral", "tiny", "fwd", "ours", ms=0.25, gbps=20.0, shape=shape),
    ]


def test_summary_puts_providers_side_by_side():
    lines = results.summary_lines(_records())
    text = "\n".join(lines)
    naive = next(line for line in lines if line.strip().startswith("naive_loop"))
    # ours faster = naive time / ours time = 8 / 2 (baseline time / our time).
    assert naive.split()[5] == "4.00x"
    assert "[layer] mixtral (tiny) fwd+bwd" in text and "[permute] mixtral (tiny) fwd" in text
    assert "scattermoe" in text and "not importable" in text


def test_summary_without_timings_says_so():
    recs = [Record("layer", "mixtral", "tiny", "fwd", "ours"), Record("layer", "mixtral", "tiny", "fwd", "torch")]
    text = "\n".join(results.summary_lines(recs))
    assert "timing disabled" in text and "checked against reference.py: ours, torch" in text


def test_save_and_render(tmp_path):
    meta = {"schema": results.SCHEMA, "device": "test-device", "torch": "0", "triton": "0", "cuda": None,
            "date": "2000-01-01T00:00:00+00:00"}
    path = results.save(_records(), tmp_path, metadata=meta)
    data = json.loads(path.read_text())
    assert path.name.endswith("_test-device.json") and data["device"] == "test-device"
    assert len(data["records"]) == 6 and data["records"][3]["provider"] == "ours"
    (tmp_path / "other.json").write_text(json.dumps({"schema": 999}))  # another schema: ignored

    assert render_results.main(["--dir", str(tmp_path)]) == 0
    md = (tmp_path / "RESULTS.md").read_text()
    assert "## test-device" in md
    assert ("| mixtral | tiny | fwd+bwd | 1.000 ms (2.00 TFLOP/s) | 8.000 ms (0.25 TFLOP/s) "
            "| 2.000 ms (1.00 TFLOP/s) | 4.00x |") in md
    assert "| mixtral | tiny | fwd | 0.500 ms (10.00 GB/s) | 0.250 ms (20.00 GB/s) | 2.00x |" in md
    assert "*scattermoe*: skipped (scattermoe is not importable here)" in md
    png = tmp_path / "results.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not png.exists()
    else:
        assert png.stat().st_size > 0


def test_render_with_no_results(tmp_path):
    assert render_results.main(["--dir", str(tmp_path), "--no-plot"]) == 0
    assert "No results yet" in (tmp_path / "RESULTS.md").read_text()


def test_save_from_env_needs_a_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv(results.SAVE_ENV, str(tmp_path))
    msg = results.save_from_env(_records())
    if torch.cuda.is_available():
        assert "saved to" in msg and list(tmp_path.glob("*.json"))
    else:
        assert "nothing saved, no GPU" in msg and not list(tmp_path.glob("*.json"))


def test_summary_shows_anchor_claims_for_full_sizes_only():
    full = [Record("layer", "peft-moe-lora", "full", "fwd+bwd", "ours", ms=3.0)]
    tiny = [Record("layer", "peft-moe-lora", "tiny", "fwd+bwd", "ours", ms=3.0)]
    assert any("4.97 ms" in line for line in results.summary_lines(full))
    assert not any("4.97 ms" in line for line in results.summary_lines(tiny))
