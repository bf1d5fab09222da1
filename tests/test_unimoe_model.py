"""The reference Uni-MoE (models/): its three stages (plus the LLM stand-in stage 0) train, the KV
cache, SparseMoE vs the naive loop inside the model, checkpoints and resume, the data, the jobs.

Everything runs on the "micro" preset (width 32, 4 image patches, 4 audio queries) with a handful
of steps and one intra-op thread, so the whole file takes well under a minute on 2 CPU cores.
"""

import copy
import json
import os

import pytest
import torch
from tolerance import MODEL_TRITON_FP32, TOL

from unimoe_kernels.__main__ import main
from unimoe_kernels.models import synthetic_data as sd
from unimoe_kernels.models import training as T
from unimoe_kernels.models.unimoe import PAD_GROUP, UniMoE, UniMoEConfig, answer_accuracy, preset_config
from unimoe_kernels.modules import SparseMoE

# Steps and peak learning rates per stage for the chain: enough for the held-out loss to fall
# clearly at micro size (stage 0 must get past the plateau before it learns to copy from context,
# or stage 1 has nothing to align to). About 10 s in all on one core.
CHAIN_STEPS = {0: 120, 1: 40, 2: 60, 3: 60}
CHAIN_LR = {0: 5e-3, 1: 5e-3, 2: 3e-3, 3: 5e-3}
BATCH = 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes; see conftest.py


def _heldout_loss(model: UniMoE, stage: int) -> float:
    """Eval-mode loss on batches of the stage's data that no training step draws (seed 777)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        loss = sum(model.loss(T.stage_batches(model.cfg, stage, s, BATCH, seed=777)).item() for s in range(4)) / 4
    model.train(was)
    return loss


@pytest.fixture(scope="module")
def chain():
    """A micro model trained through stages 0-3, with snapshots and held-out losses around each stage."""
    torch.manual_seed(0)
    model = UniMoE(preset_config("micro"))
    out = {"before": {}, "after": {}, "snap": {}}
    for stage in range(4):
        model.setup_stage(stage)  # converts the FFNs first, so the "before" loss is the stage's start
        out["snap"][stage] = copy.deepcopy(model)
        out["before"][stage] = _heldout_loss(model, stage)
        rec = T.train_stage(model, stage, CHAIN_STEPS[stage], batch_size=BATCH, lr=CHAIN_LR[stage], seed=1)
        assert len(rec["history"]) == CHAIN_STEPS[stage]
        out["after"][stage] = _heldout_loss(model, stage)
        out[stage] = copy.deepcopy(model)
    return out


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stage_loss_falls(chain, stage):
    before, after = chain["before"][stage], chain["after"][stage]
    assert after < 0.9 * before, f"stage {stage}: held-out loss {before:.4f} -> {after:.4f}"


def _params(m: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def test_stage1_trains_encoders_and_connectors_only(chain):
    before, after = _params(chain["snap"][1]), _params(chain[1])
    llm = [k for k in before if k.startswith(("embed_tokens", "layers", "norm", "lm_head"))]
    assert llm and all(torch.equal(before[k], after[k]) for k in llm), "stage 1 must leave the LLM frozen"
    for prefix in ("vision_connector", "audio_connector", "image_encoder", "audio_encoder"):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix


def test_stage2_specialises_one_ffn_per_modality(chain):
    before, after = _params(chain["snap"][2]), _params(chain[2])
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".mlp.ffns." in k for k in changed), "only the modality FFNs train in stage 2"
    for layer in chain[2].moe_layers():
        ffns = layer.mlp.ffns
        assert len(ffns) == len(sd.MODALITIES)
        # Each copy started equal; each saw only its own modality's batches, so all now differ.
        w = [f.gate_proj.weight for f in ffns]
        assert all(not torch.equal(w[i], w[j]) for i in range(len(w)) for j in range(i + 1, len(w)))


def test_stage3_experts_come_from_stage2_ffns(chain):
    start, end = chain["snap"][3], chain[3]
    for layer2, layer3, layer_end in zip(chain[2].moe_layers(), start.moe_layers(), end.moe_layers()):
        moe = layer3.mlp
        assert isinstance(moe, SparseMoE) and moe.num_experts == 4 and moe.top_k == 2
        ex = moe.experts
        assert ex.lora_rank == 8 and ex.lora_scale == 2.0 and ex.lora_dropout == 0.05 and ex.base_frozen
        assert moe.aux_loss_coef == 0.01 and moe.router.weight.dtype == torch.float32
        f = ex.ffn_hidden_size
        for e, ffn in enumerate(layer2.mlp.ffns):
            assert torch.equal(ex.gate_up_proj[e, :f], ffn.gate_proj.weight)
            assert torch.equal(ex.gate_up_proj[e, f:], ffn.up_proj.weight)
            assert torch.equal(ex.down_proj[e], ffn.down_proj.weight)
        # After tuning: base untouched, LoRA B moved off zero, router trained.
        ex_end = layer_end.mlp.experts
        assert torch.equal(ex_end.gate_up_proj, ex.gate_up_proj) and torch.equal(ex_end.down_proj, ex.down_proj)
        assert ex_end.lora_B_gate_up.abs().sum() > 0 and ex_end.lora_B_down.abs().sum() > 0
        assert not torch.equal(layer_end.mlp.router.weight, moe.router.weight)
    before, after = _params(start), _params(end)
    frozen = [k for k in before if not (".lora_" in k or ".router." in k)]
    assert all(torch.equal(before[k], after[k]) for k in frozen), "stage 3 trains LoRA and routers only"


def test_routing_stats_count_every_slot_per_modality(chain):
    model = copy.deepcopy(chain[3]).eval()
    model.reset_routing_stats()
    batches = T.eval_batches(model.cfg, 4)
    with torch.no_grad():
        for b in batches:
            embeds, _, groups, mod, lengths = model.build_inputs(b)
            model(embeds, groups, mod)
    stats = model.routing_stats()
    assert stats.shape == (len(sd.MODALITIES), 4)
    # Every real (non-pad) position of every MoE layer sends top_k slots; count them independently.
    n_layers = len(model.sparse_moes())
    media = {"image": model.image_encoder.num_patches, "video": model.image_encoder.num_patches,
             "audio": model.cfg.audio_queries, "text": 0}
    expect = torch.zeros(len(sd.MODALITIES), dtype=torch.int64)
    for b in batches:
        rows = b.prompt.shape[0]
        expect[sd.MODALITY_ID[b.modality]] += rows * media[b.modality] * 2 * n_layers
        text_positions = rows * b.prompt.shape[1] + int((b.answer != sd.PAD).sum())
        expect[sd.MODALITY_ID["text"]] += text_positions * 2 * n_layers
    assert torch.equal(stats.sum(1), expect)


@pytest.mark.parametrize("stage", [0, 2, 3])  # dense FFNs, per-modality FFNs, SparseMoE
def test_generate_with_kv_cache_equals_recompute(chain, stage):
    model = chain[stage].eval()
    for b in T.eval_batches(model.cfg, 5, seed=3):
        fast, fast_logits = model.generate(b, max_new_tokens=4, use_cache=True, return_logits=True)
        slow, slow_logits = model.generate(b, max_new_tokens=4, use_cache=False, return_logits=True)
        assert torch.equal(fast, slow), b.modality
        torch.testing.assert_close(fast_logits, slow_logits, **TOL[torch.float32])
        assert fast.shape == (5, 4)
    model.train()


def test_fused_layers_equal_naive_loop(chain):
    model = copy.deepcopy(chain[3]).eval()
    batches = T.stage_batches(model.cfg, 3, 0, 12, seed=5)  # mixed modalities, right-padded
    embeds, labels, groups, mod, _ = model.build_inputs(batches)
    with torch.no_grad():
        fused = model(embeds, groups, mod)
        model.set_moe_impl("naive")
        naive = model(embeds, groups, mod)
    torch.testing.assert_close(fused, naive, **TOL[torch.float32])
    # The comparison is not vacuous: LoRA is trained (nonzero B) and each token mixes 2 experts.
    assert any(m.experts.lora_B_down.abs().max() > 0 for m in model.sparse_moes())
    with pytest.raises(ValueError, match="moe_impl"):
        model.set_moe_impl("loop")


def test_fused_triton_kernels_in_model_equal_naive_loop(chain, device):
    # The model's MoE layers on the Triton kernels (the interpreter on CPU): same logits as the naive loop.
    model = copy.deepcopy(chain[3]).eval().to(device)
    for moe in model.sparse_moes():
        moe.router.backend = moe.experts.backend = "triton"
    batches = T.stage_batches(model.cfg, 3, 0, 4, seed=6)  # one example per modality: T = 4 x 14 positions
    embeds, _, groups, mod, _ = model.build_inputs(batches)
    with torch.no_grad():
        fused = model(embeds, groups, mod)
        model.set_moe_impl("naive")
        naive = model(embeds, groups, mod)
    torch.testing.assert_close(fused, naive, **MODEL_TRITON_FP32)


class _Interrupt(Exception):
    pass


def _interrupted(model, stage, steps, after, **kwargs):
    """train_stage of a `steps`-step run stopped by an exception once `after` steps are checkpointed."""
    def stop(step, _loss):
        if step == after:  # raised before step `after + 1` is saved: the checkpoint is at `after`
            raise _Interrupt

    with pytest.raises(_Interrupt):
        T.train_stage(model, stage, steps, save_every=1, on_step=stop, **kwargs)


def test_checkpoint_resume_is_exact(chain, tmp_path):
    a_dir, b_dir = str(tmp_path / "a"), str(tmp_path / "b")
    a = copy.deepcopy(chain[2])
    rec_a = T.train_stage(a, 3, 6, batch_size=8, seed=2, out_dir=a_dir)
    b = copy.deepcopy(chain[2])
    _interrupted(b, 3, 6, 3, batch_size=8, seed=2, out_dir=b_dir)
    assert T.read_trainer_state(b_dir)["step"] == 3
    b2 = copy.deepcopy(chain[2])                                    # a new process: the stage-2 model
    rec_b = T.train_stage(b2, 3, 6, batch_size=8, seed=2, out_dir=b_dir)
    assert rec_b["history"] == rec_a["history"] and len(rec_a["history"]) == 6
    sa, sb = a.state_dict(), b2.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    loaded = T.load_model(a_dir)
    assert loaded.ffn_mode == "moe"
    sl = loaded.state_dict()
    assert all(torch.equal(sa[k], sl[k]) for k in sa)
    meta = T.read_trainer_state(a_dir)
    assert meta["stage"] == 3 and meta["step"] == 6 and meta["config"] == a.cfg.to_dict()


def test_resume_without_optimizer_state_differs(chain, tmp_path):
    # Guards the resume test: if AdamW moments were not restored, the continued run would differ.
    d = str(tmp_path / "c")
    full = copy.deepcopy(chain[2])
    T.train_stage(full, 3, 6, batch_size=8, seed=2)
    part = copy.deepcopy(chain[2])
    _interrupted(part, 3, 6, 3, batch_size=8, seed=2, out_dir=d)
    os.remove(os.path.join(d, "optimizer.safetensors"))
    cont = copy.deepcopy(chain[2])
    T.train_stage(cont, 3, 6, batch_size=8, seed=2, out_dir=d)
    sf, sc = full.state_dict(), cont.state_dict()
    assert any(not torch.equal(sf[k], sc[k]) for k in sf)


def test_synthetic_data_is_deterministic_and_answerable():
    spec = sd.DataSpec()
    for m in sd.MODALITIES:
        b1 = sd.make_batch(spec, m, 24, torch.Generator().manual_seed(4))
        b2 = sd.make_batch(spec, m, 24, torch.Generator().manual_seed(4))
        assert torch.equal(b1.prompt, b2.prompt) and torch.equal(b1.answer, b2.answer)
        assert (b1.media is None) == (m == "text") and (b1.media is None or torch.equal(b1.media, b2.media))
        for task, ans in zip(b1.task, b1.answer):
            assert task in sd.TASKS[m]
            assert sd.VOCAB[ans[0]] in sd.ANSWERS[task] and ans[1] == sd.EOS
    # The media carry the answer: the object's pixels have the named colour ...
    g = torch.Generator().manual_seed(0)
    colour, shape = torch.arange(8), torch.arange(8) % 6
    img = sd.render_images(colour, shape, spec, g)
    for i in range(8):
        bright = img[i].amax(0) > 0.5
        mean = img[i][:, bright].mean(1)
        rgb = sd.RGB[sd.COLOURS[i]]
        assert torch.allclose(mean / mean.max(), torch.tensor(rgb) / max(rgb), atol=0.15)
    # ... and the tone's loudest STFT bin is the named pitch's.
    pitch = torch.arange(6)
    spec_ = sd.render_audio(pitch, torch.full((6,), 3), spec, g)
    bin_hz = spec.sample_rate / spec.n_fft
    peak = spec_.mean(1).argmax(1).float() * bin_hz
    assert torch.all((peak - torch.tensor(sd.PITCH_HZ)).abs() <= 1.5 * bin_hz)
    assert sd.chance_accuracy(["colour", "beats"]) == pytest.approx((1 / 8 + 1 / 4) / 2)


def test_accuracy_is_scored_against_the_answers(chain):
    model = chain[0]
    batch = T.eval_batches(model.cfg, 16, modalities=("text",))
    acc = answer_accuracy(model, batch)
    # A model that answers with the truth scores 1 and a wrong one 0: check by rigging generate.
    rig = copy.deepcopy(model)
    rig.generate = lambda b, max_new_tokens, use_cache=True: b.answer.clone()
    assert answer_accuracy(rig, batch)["accuracy"] == 1.0
    rig.generate = lambda b, max_new_tokens, use_cache=True: torch.full_like(b.answer, sd.EOS)
    assert answer_accuracy(rig, batch)["accuracy"] == 0.0
    assert 0.0 <= acc["accuracy"] <= 1.0 and acc["examples"] == 16


def test_bad_input_is_rejected(chain):
    with pytest.raises(ValueError, match="num_heads"):
        UniMoEConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="expert_modalities"):
        UniMoEConfig(expert_modalities=("smell",))
    with pytest.raises(ValueError, match="top_k"):
        UniMoEConfig(expert_modalities=("image",), top_k=2)
    with pytest.raises(ValueError, match="preset"):
        preset_config("huge")
    model = copy.deepcopy(chain[0])
    with pytest.raises(ValueError, match="stage"):
        model.setup_stage(4)
    with pytest.raises(RuntimeError, match="stage 2 first"):
        model.to_moe()
    with pytest.raises(ValueError, match="embeds"):
        model(torch.zeros(2, 3, model.cfg.hidden_size + 1))
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(T.eval_batches(model.cfg, 2)[0], max_new_tokens=0)
    with pytest.raises(ValueError, match="example_modality"):
        m2 = copy.deepcopy(chain[2])
        m2(torch.zeros(1, 3, m2.cfg.hidden_size))
    with pytest.raises(ValueError, match="modality"):
        sd.make_batch(sd.DataSpec(), "smell", 2, torch.Generator())
    with pytest.raises(ValueError, match="not asked"):
        sd.make_batch(sd.DataSpec(), "image", 2, torch.Generator(), tasks=("pitch",))
    with pytest.raises(ValueError, match="batch_size"):
        sd.make_batch(sd.DataSpec(), "image", 0, torch.Generator())


def test_padding_positions_are_masked_and_grouped(chain):
    model = chain[3]
    batches = T.stage_batches(model.cfg, 3, 0, 8, seed=8)
    embeds, labels, groups, mod, lengths = model.build_inputs(batches)
    pos = torch.arange(embeds.shape[1])[None]
    pad = pos >= lengths[:, None]
    assert pad.any(), "text rows are shorter than media rows, so this batch must be padded"
    assert torch.all(groups[pad] == PAD_GROUP) and torch.all(labels[pad] == -100)
    # One label per answer token (word + <eos>), at the position before it.
    assert int((labels != -100).sum()) == sum(int((b.answer != sd.PAD).sum()) for b in batches)


def test_jobs_train_resume_generate(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    common = ["--out", out, "--preset", "micro", "--batch-size", "8", "--no-progress", "--eval-examples", "2"]
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--stage", "1", "--steps", "2", *common])
    assert exit_.value.code == 2 and "error: stage 1 starts from a stage-0 checkpoint" in capsys.readouterr().err
    for stage in range(4):
        extra = ["--freeze-encoders"] if stage == 1 else []
        assert main(["train", "--stage", str(stage), "--steps", "2", *common, *extra]) == 0
        meta = json.load(open(os.path.join(out, f"stage{stage}", "trainer.json")))
        assert meta["stage"] == stage and meta["step"] == 2 and len(meta["history"]) == 2
        assert meta["ffn_mode"] == {0: "dense", 1: "dense", 2: "modality", 3: "moe"}[stage]
    s0, s1 = T.load_model(os.path.join(out, "stage0")), T.load_model(os.path.join(out, "stage1"))
    assert torch.equal(s0.image_encoder.patch_embed.weight, s1.image_encoder.patch_embed.weight)  # --freeze-encoders
    assert not torch.equal(s0.vision_connector.fc1.weight, s1.vision_connector.fc1.weight)
    # A 4-step stage 3 interrupted after 2 steps resumes there: the first two losses are kept.
    real = T.stage_batches

    def interrupt_at_step_2(cfg, stage, step, *a, **k):
        if step == 2:
            raise _Interrupt
        return real(cfg, stage, step, *a, **k)

    monkeypatch.setattr(T, "stage_batches", interrupt_at_step_2)
    with pytest.raises(_Interrupt):
        main(["train", "--stage", "3", "--steps", "4", "--fresh", "--save-every", "1", *common])
    monkeypatch.undo()
    first = json.load(open(os.path.join(out, "stage3", "trainer.json")))["history"]
    assert len(first) == 2
    capsys.readouterr()
    assert main(["train", "--stage", "3", "--steps", "4", *common]) == 0
    assert "resuming" in capsys.readouterr().out
    meta = json.load(open(os.path.join(out, "stage3", "trainer.json")))
    assert meta["step"] == 4 and meta["history"][:2] == first and len(meta["history"]) == 4
    assert main(["generate", "--out", out, "-n", "2"]) == 0
    text = capsys.readouterr().out
    assert text.count("truth:") == 2 * len(sd.MODALITIES) and "tokens/s" in text
    assert main(["generate", "--out", out, "-n", "1", "--naive", "--modality", "audio"]) == 0


def test_demo_job_writes_report(tmp_path):
    out = str(tmp_path / "demo")
    args = ["demo", "--out", out, "--preset", "micro", "--steps-scale", "0.02", "--batch-size", "8",
            "--eval-examples", "2", "--bench-rounds", "1", "--bench-steps", "1", "--no-progress",
            "--stack", "micro", "--stack-device", "cpu"]
    assert main(args) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert [s["stage"] for s in report["stages"]] == [0, 1, 2, 3]
    thr = report["throughput"]
    for key in ("train_tokens_per_s", "generate_tokens_per_s"):
        assert thr[key]["fused"] > 0 and thr[key]["naive"] > 0
    assert report["layer_stack"]["shape"] == "micro" and report["layer_stack"]["speedup_vs_naive"] > 0
    load = report["expert_load"]
    assert len(load["fraction"]) == len(sd.MODALITIES) and len(load["fraction"][0]) == 4
    for row, counts in zip(load["fraction"], load["counts"]):
        assert sum(counts) > 0 and sum(row) == pytest.approx(1.0)
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # documented: report.json only, no plot files
        assert not [f for f in os.listdir(out) if f.endswith(".png")]
        return
    for name in ("loss_curves.png", "accuracy.png", "throughput.png", "expert_load.png"):
        assert os.path.getsize(os.path.join(out, name)) > 1000


@pytest.mark.gpu
def test_bf16_model_on_triton_kernels_matches_naive_loop(chain):
    # bf16 only on a GPU (the interpreter cannot run it). The naive loop accumulates the combine in
    # bf16 and ours in fp32, so logits agree to bf16 precision, not bit for bit.
    model = copy.deepcopy(chain[3]).eval().to("cuda", torch.bfloat16)
    batches = T.stage_batches(model.cfg, 3, 0, 32, seed=9)
    embeds, labels, groups, mod, _ = model.build_inputs(batches)
    with torch.no_grad():
        fused = model(embeds, groups, mod)
        model.set_moe_impl("naive")
        naive = model(embeds, groups, mod)
    real = labels != -100
    assert (fused.argmax(-1)[real] == naive.argmax(-1)[real]).float().mean() > 0.95
    assert (fused - naive).abs().mean() < 0.05 * naive.abs().mean()
    # A training step of the bf16 model on the kernels gives finite gradients to LoRA and routers.
    model.set_moe_impl("fused")
    model.train()
    params = model.setup_stage(3)
    model.loss(batches).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


def test_attention_is_causal_and_rope_is_relative(chain):
    model = chain[0].eval()
    torch.manual_seed(1)
    x = torch.randn(2, 9, model.cfg.hidden_size)
    with torch.no_grad():
        base = model(x)
        y = x.clone()
        y[:, 6:] = torch.randn(2, 3, model.cfg.hidden_size)  # change only the last 3 positions
        changed = model(y)
    torch.testing.assert_close(base[:, :6], changed[:, :6], **TOL[torch.float32])
    assert (base[:, 6:] - changed[:, 6:]).abs().max() > 1e-3
    # RoPE: q.k depends on positions only through their difference.
    from unimoe_kernels.models.unimoe import rope

    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    dot = lambda pq, pk: (rope(q, torch.tensor([pq]), 1e4) * rope(k, torch.tensor([pk]), 1e4)).sum()  # noqa: E731
    torch.testing.assert_close(dot(3, 1), dot(10, 8), **TOL[torch.float32])
    assert (dot(3, 1) - dot(3, 2)).abs() > 1e-4


def test_custom_encoders_plug_in():
    from unimoe_kernels.models.encoders import AudioEncoder, ImageEncoder

    cfg = preset_config("micro")
    image = ImageEncoder(cfg.data.image_size, 8, width=24, layers=2, heads=2)    # a different feature width
    audio = AudioEncoder(cfg.data.audio_bins, cfg.data.audio_frames, width=40, layers=1, heads=2)
    model = UniMoE(cfg, image_encoder=image, audio_encoder=audio)
    assert model.vision_connector.fc1.in_features == 24 and model.audio_connector.kv_proj.in_features == 40
    loss = model.loss(T.stage_batches(cfg, 1, 0, 6))
    assert torch.isfinite(loss)
    with pytest.raises(TypeError, match="image_encoder"):
        UniMoE(cfg, image_encoder=torch.nn.Identity())
