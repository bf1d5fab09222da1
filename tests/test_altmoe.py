"""Alt-MoE connector: the predictor against an independent per-token fp64 loop, the losses against
hand-written formulas, alternating training (round-robin and adaptive) lifting Recall@1 far above
chance in both directions on the synthetic task, the vector store round trip and search against a
brute-force ranking, bad inputs, the CLI end to end, and every name still importable from
models.altmoe (the import-circle check is tests/test_structure.py's). Everything runs on CPU in
seconds: the predictor uses SparseMoE's torch path on CPU tensors (no Triton involved)."""

import importlib
import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unimoe_kernels.models.altmoe import (
    AltMoEConfig,
    AltMoEPredictor,
    DirectionOptim,
    DirectionSampler,
    SyntheticPairs,
    altmoe_loss,
    encode_modalities,
    info_nce,
    load_predictor,
    lr_lambda,
    save_predictor,
    train_alternating,
)
from unimoe_kernels.models.altmoe_retrieval import VectorStore, evaluate_directions, recall_at_k

# Tiny demo: 8-d factor, embeddings of 32 and 24 dims (different widths so a swapped projection
# fails), 0.1 noise (oracle R@1 on a 128 gallery is 1.0, so the connector is the only limit).
DIMS = {"a": 32, "b": 24}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes; see conftest.py


@pytest.fixture(scope="module")
def task():
    return SyntheticPairs(DIMS, latent_dim=8, noise=0.1, seed=0)


@pytest.fixture(scope="module")
def data(task):
    # 1024 training pairs, 128 validation pairs: chance Recall@1 on the val gallery is 1/128.
    return task.embeddings(1024, seed=1), task.embeddings(128, seed=2)


def _small_config(**kw):
    kw.setdefault("width", 64)
    return AltMoEConfig(dims=DIMS, **kw)


# ------------------------------------------------------------------------------------------------
# Predictor vs an independent loop
# ------------------------------------------------------------------------------------------------


def _reference_forward(p: AltMoEPredictor, x: torch.Tensor, direction: str):
    """Per token, per task, per chosen expert, in fp64, from the raw parameters."""
    d = direction
    moe = p.moe
    e_up, e_down = moe.experts.gate_up_proj, moe.experts.down_proj   # [E, F, W], [E, W, F]
    h = F.gelu(x @ p.in_proj[d].weight.t() + p.in_proj[d].bias) + p.dir_embed[d]
    outs = []
    for task in range(2):
        t = h + p.task_embed[task]
        rows = []
        for i in range(t.shape[0]):
            probs = torch.softmax(t[i] @ moe.router.weight.t(), dim=-1)
            top = torch.topk(probs, p.config.top_k).indices
            w = probs[top]
            if p.config.normalize_topk:
                w = w / w.sum()
            y = sum(w[j] * (e_down[e] @ F.gelu(e_up[e] @ t[i])) for j, e in enumerate(top.tolist()))
            rows.append(y)
        m = torch.stack(rows)
        o = F.layer_norm(t + m, (t.shape[1],), p.norms[task].weight, p.norms[task].bias, p.norms[task].eps)
        head = p.pred_head[d] if task == 0 else p.contr_head[d]
        outs.append(o @ head.weight.t() + head.bias)
    return outs


@pytest.mark.parametrize("normalize_topk", [False, True])
@pytest.mark.parametrize("direction", ["a_to_b", "b_to_a"])
def test_predictor_matches_per_token_loop(direction, normalize_topk):
    p = AltMoEPredictor(_small_config(width=16, ffn_hidden_size=24, normalize_topk=normalize_topk)).double().eval()
    src = direction.split("_to_")[0]
    # 7 tokens: fewer than the 12 experts, so some experts get no token (an edge of the routing).
    x = torch.randn(7, DIMS[src], dtype=torch.float64)
    out = p(x, direction)
    pred_ref, contr_ref = _reference_forward(p, x, direction)
    torch.testing.assert_close(out.prediction, pred_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.contrastive, contr_ref, rtol=1e-10, atol=1e-10)


def test_defaults_are_the_released_choice():
    p = AltMoEPredictor(_small_config())
    assert (p.moe.num_experts, p.moe.top_k, p.moe.router.normalize_topk) == (12, 4, False)
    assert p.moe.experts.activation == "gelu" and p.config.temperature == 0.03
    x = torch.randn(5, p.config.width)
    # Without renormalisation the 4 chosen softmax weights of 12 experts sum to less than 1.
    assert (p.moe.router(x).weights.sum(-1) < 1 - 1e-3).all()


def test_multi_gate_routes_tasks_separately():
    p = AltMoEPredictor(_small_config()).eval()
    with torch.no_grad():
        p.task_embed.normal_(0, 1.0)   # well separated tasks, so their routing must differ
    x = torch.randn(40, DIMS["a"])
    p.moe.reset_routing_stats()
    p(x, "a_to_b", track_routing=True)
    stats = p.moe.routing_stats()
    # Groups 0/1: direction a_to_b (index 0), prediction and contrastive tokens: 40 tokens x 4 slots each.
    assert stats[0].sum() == stats[1].sum() == 40 * 4
    assert stats[2:].sum() == 0
    assert not torch.equal(stats[0], stats[1])


def test_output_shapes_and_empty_batch():
    p = AltMoEPredictor(_small_config()).eval()
    out = p(torch.randn(3, DIMS["b"]), "b_to_a")
    assert out.prediction.shape == out.contrastive.shape == (3, DIMS["a"])
    # Empty batch (0 queries) -> empty outputs, no crash.
    assert p(torch.randn(0, DIMS["a"]), "a_to_b").prediction.shape == (0, DIMS["b"])
    assert p.embed_queries(torch.randn(0, DIMS["a"]), "a_to_b").shape == (0, DIMS["b"])
    q = p.embed_queries(torch.randn(5, DIMS["a"]), "a_to_b", batch_size=2)
    torch.testing.assert_close(q.norm(dim=1), torch.ones(5))


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------


def test_info_nce_matches_formula():
    pred, tgt = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    tau = 0.03
    s = [[float(pred[i] @ tgt[j] / (pred[i].norm() * tgt[j].norm())) / tau for j in range(6)] for i in range(6)]
    rows = [-(s[i][i] - math.log(sum(math.exp(v) for v in s[i]))) for i in range(6)]
    cols = [-(s[j][j] - math.log(sum(math.exp(s[i][j]) for i in range(6)))) for j in range(6)]
    expected = 0.5 * (sum(rows) / 6 + sum(cols) / 6)
    assert info_nce(pred, tgt, tau).item() == pytest.approx(expected, rel=1e-5)
    assert info_nce(pred, tgt, tau).item() == pytest.approx(info_nce(tgt, pred, tau).item(), rel=1e-6)
    # Aligned pairs (scaled copies: the norm must not matter) give a loss near 0 at tau 0.03 for
    # orthogonal vectors; shuffled pairs a large one.
    eye = torch.eye(6)
    assert info_nce(3 * eye, eye).item() < 1e-6
    assert info_nce(eye[[1, 2, 3, 4, 5, 0]], eye).item() > 10


def test_altmoe_loss_is_one_to_one():
    cfg = _small_config()
    p = AltMoEPredictor(cfg)
    x, y = torch.randn(8, DIMS["a"]), torch.randn(8, DIMS["b"])
    out = p(x, "a_to_b")
    loss = altmoe_loss(out, y, cfg)
    expected_pred = F.smooth_l1_loss(out.prediction, y)
    torch.testing.assert_close(loss.prediction, expected_pred)
    torch.testing.assert_close(loss.contrastive, info_nce(out.contrastive, y, 0.03))
    torch.testing.assert_close(loss.total, loss.prediction + loss.contrastive)


# ------------------------------------------------------------------------------------------------
# Alternating training
# ------------------------------------------------------------------------------------------------


def _train(data, schedule, steps=60):
    train, val = data
    torch.manual_seed(0)
    p = AltMoEPredictor(_small_config())
    # 3e-3: a short run needs a higher peak than M3-JEPA's 1.5e-3 (measured: R@1 > 0.6 in 60 steps).
    optim = {d: DirectionOptim(lr=3e-3) for d in p.directions}
    hist = train_alternating(p, train, val, steps=steps, batch_size=64, schedule=schedule, optim=optim,
                             eval_every=30, seed=0)
    return p, hist


@pytest.mark.parametrize("schedule", ["round_robin", "adaptive"])
def test_alternating_training_lifts_recall_both_directions(data, schedule):
    p, hist = _train(data, schedule)
    chance = 1 / 128
    first, last = hist.evals[0]["recall"], hist.final_recall()
    for d in ("a_to_b", "b_to_a"):
        assert first[d]["R@1"] < 10 * chance          # untrained: about chance
        assert last[d]["R@1"] > 0.4                   # trained: > 50x chance
        assert last[d]["R@10"] >= last[d]["R@5"] >= last[d]["R@1"]
    assert sum(hist.steps_per_direction.values()) == 60
    if schedule == "round_robin":
        assert hist.steps_per_direction == {"a_to_b": 30, "b_to_a": 30}
    else:
        # Adapted after each eval: a probability per direction, the floor respected, summing to 1.
        probs = hist.evals[-1]["probs"]
        need = {d: 1 - last[d]["R@1"] + 0.05 for d in probs}   # smoothing 0.05, floor 0.1
        for d in probs:
            assert probs[d] == pytest.approx(0.9 * need[d] / sum(need.values()) + 0.1 / 2)
        assert sum(probs.values()) == pytest.approx(1.0)
        assert min(hist.steps_per_direction.values()) > 0
    # Independent check of the recorded recall on the same val set.
    again = evaluate_directions(p, data[1])
    assert again["a_to_b"]["R@1"] == pytest.approx(last["a_to_b"]["R@1"])
    # The losses logged between evals fell.
    assert hist.evals[-1]["loss"]["a_to_b"]["total"] < hist.evals[1]["loss"]["a_to_b"]["total"]


def test_one_step_updates_only_its_direction(data):
    train, val = data
    p = AltMoEPredictor(_small_config())
    before = {k: v.detach().clone() for k, v in p.state_dict().items()}
    # warmup_frac 0 so the single step has a nonzero LR.
    optim = {d: DirectionOptim(warmup_frac=0.0) for d in p.directions}
    train_alternating(p, train, val, steps=1, batch_size=16, optim=optim, eval_every=1)
    changed = {k for k, v in p.state_dict().items() if not torch.equal(v, before[k])}
    assert "in_proj.a_to_b.weight" in changed and "contr_head.a_to_b.weight" in changed
    assert "moe.router.weight" in changed and "moe.experts.gate_up_proj" in changed and "task_embed" in changed
    assert not any(".b_to_a" in k for k in changed)


def test_direction_sampler():
    rr = DirectionSampler(["x", "y", "z"])
    assert [rr.next() for _ in range(7)] == ["x", "y", "z", "x", "y", "z", "x"]
    ad = DirectionSampler(["x", "y"], "adaptive", seed=1)
    ad.update({"x": 0.9, "y": 0.2})
    # Lagging direction y: p_y = 0.9 * (0.8 + 0.05) / (0.15 + 0.85) + 0.05 = 0.815.
    assert ad.probs[1] == pytest.approx(0.815)
    picks = [ad.next() for _ in range(4000)]
    assert picks.count("y") / 4000 == pytest.approx(0.815, abs=0.03)
    # A perfect direction is never starved.
    ad.update({"x": 1.0, "y": 0.0})
    assert ad.probs[0] >= 0.05
    with pytest.raises(ValueError, match="schedule"):
        DirectionSampler(["x"], "greedy")


def test_lr_schedule_shape():
    # 100 steps, 10 warm-up, floor 0.01: linear up, peak at the end of warm-up, cosine down.
    assert lr_lambda(0, 100, 10, 0.01) == pytest.approx(0.1)
    assert lr_lambda(9, 100, 10, 0.01) == pytest.approx(1.0)
    assert lr_lambda(55, 100, 10, 0.01) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_lambda(100, 100, 10, 0.01) == pytest.approx(0.01)


def test_per_direction_learning_rates(data):
    train, val = data
    p = AltMoEPredictor(_small_config())
    optim = {"a_to_b": DirectionOptim(lr=1e-3, warmup_frac=0.0), "b_to_a": DirectionOptim(lr=4e-3, warmup_frac=0.5)}
    hist = train_alternating(p, train, val, steps=4, batch_size=16, optim=optim, eval_every=4)
    lrs = hist.evals[-1]["lr"]   # lr of the last step, step index 3 of 4
    assert lrs["a_to_b"] == pytest.approx(1e-3 * lr_lambda(3, 4, 0, 0.01))
    assert lrs["b_to_a"] == pytest.approx(4e-3 * lr_lambda(3, 4, 2, 0.01))


# ------------------------------------------------------------------------------------------------
# Vector store and search
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".npz", ".safetensors"])
def test_vector_store_round_trip(tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    emb = torch.randn(37, 9)                      # 37: not a multiple of any search batch
    ids = torch.arange(100, 137)
    store = VectorStore(emb, ids, modality="text")
    path = tmp_path / f"gallery{suffix}"
    store.save(path)
    back = VectorStore.load(path)
    assert torch.equal(back.embeddings, store.embeddings) and torch.equal(back.ids, ids)
    assert back.modality == "text" and len(back) == 37 and back.dim == 9
    q = torch.randn(11, 9)
    a, b = store.search(q, 5), back.search(q, 5)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.scores, b.scores)


def test_search_matches_brute_force_and_batches():
    g = torch.randn(50, 8, dtype=torch.float64)
    q = torch.randn(13, 8, dtype=torch.float64)
    store = VectorStore(g)
    res = store.search(q.float(), 7, batch_size=4)   # 4: several batches and a ragged last one
    gn = g.numpy() / np.linalg.norm(g.numpy(), axis=1, keepdims=True)
    qn = q.numpy() / np.linalg.norm(q.numpy(), axis=1, keepdims=True)
    cos = qn @ gn.T
    expected = np.argsort(-cos, axis=1)[:, :7]
    assert np.array_equal(res.ids.numpy(), expected)
    np.testing.assert_allclose(res.scores.numpy(), np.take_along_axis(cos, expected, 1), rtol=1e-5, atol=1e-6)
    # k larger than the gallery: every item, in order.
    small = VectorStore(g[:3])
    assert small.search(q.float(), 10).ids.shape == (13, 3)
    # Zero queries: empty result of the right width.
    assert store.search(torch.zeros(0, 8), 4).ids.shape == (0, 4)


def test_recall_at_k():
    retrieved = torch.tensor([[3, 1, 2], [0, 2, 1], [2, 0, 1], [1, 3, 0]])
    truth = torch.tensor([1, 0, 1, 2])   # hits at rank 2, 1, 3, never
    r = recall_at_k(retrieved, truth, ks=(1, 2, 3, 10))
    assert r == {"R@1": 0.25, "R@2": 0.5, "R@3": 0.75, "R@10": 0.75}


# ------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------


def test_bad_inputs(tmp_path, data):
    train, val = data
    with pytest.raises(ValueError, match="gallery is empty"):
        VectorStore(torch.zeros(0, 8))
    store = VectorStore(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"queries must be \[Q, 8\]"):
        store.search(torch.randn(2, 7))
    with pytest.raises(ValueError, match="k must be a positive int"):
        store.search(torch.randn(2, 8), 0)
    with pytest.raises(ValueError, match="ids must be"):
        VectorStore(torch.randn(4, 8), torch.arange(3))
    torch.save({"something": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a saved VectorStore"):
        VectorStore.load(tmp_path / "other.pt")

    p = AltMoEPredictor(_small_config())
    with pytest.raises(ValueError, match=r"x for direction 'a_to_b' must be \[N, 32\]"):
        p(torch.randn(3, 24), "a_to_b")
    with pytest.raises(ValueError, match="direction must be one of"):
        p(torch.randn(3, 32), "a_to_c")
    with pytest.raises(TypeError, match="floating"):
        p(torch.ones(3, 32, dtype=torch.int64), "a_to_b")
    with pytest.raises(ValueError, match="top_k=13 must be <= num_experts=12"):
        _small_config(top_k=13)
    with pytest.raises(ValueError, match="at least two modality"):
        AltMoEConfig(dims={"a": 4})
    with pytest.raises(ValueError, match="directions"):
        _small_config(directions=[("a", "a")])
    with pytest.raises(ValueError, match="paired"):
        train_alternating(p, {"a": train["a"], "b": train["b"][:-1]}, val, steps=1)
    with pytest.raises(ValueError, match=r"train\['b'\] must be a floating \[N, 24\]"):
        train_alternating(p, {"a": train["a"], "b": train["a"]}, val, steps=1)
    with pytest.raises(ValueError, match="val is empty"):
        train_alternating(p, train, {m: t[:0] for m, t in val.items()}, steps=1)
    with pytest.raises(ValueError, match="unknown directions"):
        train_alternating(p, train, val, steps=1, optim={"c_to_a": DirectionOptim()})
    with pytest.raises(ValueError, match=r"encoders\['a'\] must return a floating \[batch, D\]"):
        encode_modalities({"a": lambda x: torch.zeros(3), "b": lambda x: torch.zeros(len(x), 2)},
                          {"a": torch.zeros(3, 1), "b": torch.zeros(3, 1)})


# ------------------------------------------------------------------------------------------------
# Encoders, checkpoints, CLI
# ------------------------------------------------------------------------------------------------


def test_encode_modalities_any_callable():
    # A "text" encoder over a list of strings (length features) and a torch module, in batches of 2.
    texts = ["a", "bb", "ccc", "dddd", "eeeee"]
    out = encode_modalities(
        {"text": lambda batch: torch.tensor([[len(s), 1.0] for s in batch]), "img": torch.nn.Identity()},
        {"text": texts, "img": torch.arange(10.0).view(5, 2)}, batch_size=2,
    )
    assert torch.equal(out["text"][:, 0], torch.tensor([1.0, 2, 3, 4, 5]))
    assert out["img"].shape == (5, 2) and out["img"].dtype == torch.float32


def test_synthetic_pairs_are_reproducible_and_paired(task):
    a, b = task.embeddings(64, seed=5), task.embeddings(64, seed=5)
    assert torch.equal(a["a"], b["a"])
    assert not torch.equal(task.embeddings(64, seed=6)["a"], a["a"])
    # The raw observations share a factor: the oracle retrieves far above chance.
    assert task.oracle_recall(128, 2, "a", "b")["R@1"] > 0.9
    # Frozen: the encoders hold buffers, not parameters.
    assert all(len(list(e.parameters())) == 0 for e in task.encoders.values())


def test_checkpoint_round_trip(tmp_path):
    p = AltMoEPredictor(_small_config(top_k=3, normalize_topk=True)).eval()
    save_predictor(p, tmp_path / "ckpt.pt", extra={"note": "x"})
    q, extra = load_predictor(tmp_path / "ckpt.pt")
    assert extra == {"note": "x"} and q.config == p.config
    x = torch.randn(6, DIMS["b"])
    torch.testing.assert_close(q(x, "b_to_a").contrastive, p(x, "b_to_a").contrastive, rtol=0, atol=0)


def test_cli_train_then_retrieve(tmp_path, capsys):
    from unimoe_kernels.jobs.altmoe import main

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--dims", "img=24,txt=16", "--latent-dim", "6", "--noise", "0.1",
                 "--n-train", "512", "--n-val", "64", "--n-test", "100", "--width", "48", "--steps", "40",
                 "--batch-size", "64", "--eval-every", "20", "--schedule", "adaptive", "--lr", "3e-3",
                 "--direction-lr", "txt_to_img=4e-3", "--no-progress", "--device", "cpu", "--threads", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["chance_recall_at_1"] == pytest.approx(0.01)
    for d in ("img_to_txt", "txt_to_img"):
        assert report["test_recall"][d]["R@1"] > 0.3          # 30x chance on a 100-item gallery
    assert [e["step"] for e in report["history"]] == [0, 20, 40]
    assert report["config"]["num_experts"] == 12 and report["config"]["top_k"] == 4
    assert (out / "recall.png").exists() or "skipped" in report["plot"]
    assert main(["retrieve", "--run", str(out), "--device", "cpu", "--show", "2"]) == 0
    result = json.loads((out / "retrieve.json").read_text())["results"]
    for d in ("img_to_txt", "txt_to_img"):
        # The same checkpoint, galleries and queries: the same recall as the train report.
        assert result[d]["recall"] == pytest.approx(report["test_recall"][d])
        assert len(result[d]["top_hits"]) == 2 and len(result[d]["top_hits"][0]["ids"]) == 10
    text = capsys.readouterr().out
    assert "img_to_txt" in text and "R@1" in text
    # Unpaired queries of one modality (a bare tensor file): top hits, no recall.
    torch.save(torch.randn(4, 16), tmp_path / "q.pt")
    assert main(["retrieve", "--run", str(out), "--queries", str(tmp_path / "q.pt"), "--direction", "txt_to_img",
                 "--show", "4", "--top-k", "3", "--json", str(tmp_path / "r.json")]) == 0
    hits = json.loads((tmp_path / "r.json").read_text())["results"]["txt_to_img"]
    assert "recall" not in hits and [len(h["ids"]) for h in hits["top_hits"]] == [3, 3, 3, 3]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # a command-line error: one `error:` line, exit status 2
        main(["retrieve", "--run", str(out), "--direction", "img_to_img"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "error: --direction 'img_to_img'" in err[0]

    # The run's files are the ones its checkpoint was saved with: another gallery (as a train run
    # stopped between its galleries and its checkpoint leaves) is named, not searched.
    import shutil

    from job_errors import error_line

    other = tmp_path / "other"
    shutil.copytree(out, other)
    VectorStore(torch.randn(100, 16), modality="txt").save(other / "gallery_txt.pt")
    line = error_line(capsys, ["altmoe", "retrieve", "--run", str(other), "--device", "cpu"])
    assert f"{other / 'gallery_txt.pt'} is not the file {other / 'checkpoint.pt'} was saved with" in line
    # A truncated checkpoint: one line naming it and the fix, no traceback.
    ckpt = other / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    line = error_line(capsys, ["altmoe", "retrieve", "--run", str(other), "--device", "cpu"])
    assert f"{ckpt} cannot be read" in line and f"altmoe train --out {other}" in line
    # No checkpoint: --run is suggested only to whoever did not pass it.
    line = error_line(capsys, ["altmoe", "retrieve", "--run", str(tmp_path / "none")])
    assert "does not exist: run `python -m unimoe_kernels altmoe train" in line and "pass --run" not in line


def test_training_that_diverges_stops_with_an_error(data):
    from unimoe_kernels.models.errors import TrainingDiverged

    train, val = data
    p = AltMoEPredictor(_small_config())
    with pytest.raises(TrainingDiverged, match="is nan .*lower learning rate"):
        train_alternating(p, train, val, steps=10, batch_size=32, eval_every=5,
                          optim={d: DirectionOptim(lr=1e30) for d in p.directions})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_triton_path_matches_torch_path(dtype):
    # On CUDA the predictor's SparseMoE runs the Triton kernels; the torch path with the same
    # weights is the oracle. bf16 only here: the interpreter cannot run it.
    cfg = _small_config(ffn_hidden_size=96)
    tri = AltMoEPredictor(cfg, device="cuda", dtype=dtype).eval()
    ref = AltMoEPredictor(AltMoEConfig(**{**cfg.to_dict(), "directions": cfg.directions, "backend": "torch"}),
                          device="cuda", dtype=dtype).eval()
    ref.load_state_dict(tri.state_dict())
    x = torch.randn(300, DIMS["a"], device="cuda", dtype=dtype)   # 300: not a multiple of any tile
    a, b = tri(x, "a_to_b"), ref(x, "a_to_b")
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(a.contrastive.float(), b.contrastive.float(), rtol=tol, atol=tol)
    tri.train()
    y = torch.randn(300, DIMS["b"], device="cuda")
    altmoe_loss(tri(x, "a_to_b"), y, cfg).total.backward()
    assert all(torch.isfinite(p.grad).all() for p in tri.direction_parameters("a_to_b") if p.grad is not None)


def test_triton_backend_matches_torch_backend(device):
    # The predictor through the Triton kernels (the interpreter on CPU) against the torch path with
    # the same weights, forward and gradients. 6 tokens x 2 tasks, width 16: tiny for the interpreter.
    cfg = _small_config(width=16, ffn_hidden_size=16, backend="triton")
    tri = AltMoEPredictor(cfg, device=device)
    ref_cfg = AltMoEConfig(**{**cfg.to_dict(), "directions": cfg.directions, "backend": "torch"})
    ref = AltMoEPredictor(ref_cfg, device=device)
    ref.load_state_dict(tri.state_dict())
    assert tri.moe.experts.backend == "triton" and ref.moe.experts.backend == "torch"
    x, y = torch.randn(6, DIMS["b"], device=device), torch.randn(6, DIMS["a"], device=device)
    losses, compared = [], 0
    for p in (tri, ref):
        out = p(x, "b_to_a")
        loss = altmoe_loss(out, y, cfg).total
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(tri.named_parameters(), ref.parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")
            compared += 1
    # in_proj, heads and dir_embed of b_to_a, task_embed, router, both expert tensors, both norms.
    assert compared >= 10


def test_plot_skipped_without_matplotlib(tmp_path, monkeypatch):
    import sys

    from unimoe_kernels.jobs.altmoe import _plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)   # makes `import matplotlib` raise ImportError
    history = [{"step": 0, "recall": {"a_to_b": {"R@1": 0.0, "R@10": 0.1}}}]
    assert "skipped" in _plot(history, str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------------------------
# Module layout
# ------------------------------------------------------------------------------------------------

# Every public name models.altmoe has ever defined -> the module that holds it now.
ALTMOE_NAMES = {
    "unimoe_kernels.models.altmoe_model": ["TASKS", "direction_name", "AltMoEConfig", "AltMoEOutput",
                                           "AltMoEPredictor"],
    "unimoe_kernels.models.altmoe_losses": ["info_nce", "AltMoELoss", "altmoe_loss"],
    "unimoe_kernels.models.altmoe_data": ["encode_modalities", "RandomEncoder", "SyntheticPairs"],
    "unimoe_kernels.models.altmoe_training": ["DirectionSampler", "lr_lambda", "DirectionOptim", "TrainHistory",
                                              "train_alternating"],
    "unimoe_kernels.models.altmoe_checkpoint": ["CHECKPOINT_FORMAT", "save_predictor", "load_predictor"],
}


def test_old_import_paths_still_work():
    altmoe = importlib.import_module("unimoe_kernels.models.altmoe")
    for home, names in ALTMOE_NAMES.items():
        module = importlib.import_module(home)
        for name in names:
            assert getattr(altmoe, name) is getattr(module, name), f"models.altmoe.{name} is not {home}.{name}"
    star: dict = {}
    exec("from unimoe_kernels.models.altmoe import *", star)
    assert set(altmoe.__all__) <= set(star) and set(altmoe.__all__) == {
        n for names in ALTMOE_NAMES.values() for n in names} - {"CHECKPOINT_FORMAT"}
    models = importlib.import_module("unimoe_kernels.models")
    assert (models.AltMoEConfig, models.VectorStore, models.train_alternating) == (
        AltMoEConfig, VectorStore, train_alternating)
