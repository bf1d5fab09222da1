"""The main job runs end to end at a tiny shape and reports every provider."""

import json

from unimoe_kernels.__main__ import main


def test_bench_job_tiny(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--tokens", "32", "--hidden", "16", "--ffn", "24", "--experts", "4", "--top-k", "2",
            "--lora-rank", "2", "--rounds", "2", "--device", "cpu", "--json", str(out)]
    assert main(args) == 0
    table = capsys.readouterr().out
    for provider in ("unimoe", "naive_loop", "dense_chain"):
        assert provider in table
    result = json.loads(out.read_text())
    assert result["flops_fwd_bwd"] > 0
    assert {r["provider"] for r in result["rows"]} == {"unimoe", "naive_loop", "dense_chain"}
    assert all(r["median_ms"] > 0 for r in result["rows"])
