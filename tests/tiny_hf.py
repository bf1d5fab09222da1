"""Tiny random transformers MoE models built from configs (no downloads), shared by the tests of the
transformers integration.

Shapes are tiny (H=32, two layers, 2x7 tokens) so a test runs in seconds on CPU; the expert counts
and k cover a prime E (5) and k=3 (not a power of two), Qwen2-MoE brings its shared expert with a
sigmoid gate, and the routers get N(0, 1) weights (transformers' 0.02 init makes them almost uniform)
so top-k margins are clear and no near-tie flips between two summation orders.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import transformers

VOCAB = 100
COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)


def config(family: str, **overrides):
    if family == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, **COMMON)
    elif family == "qwen2_moe":
        # Shared expert with its sigmoid gate; no renormalisation of the top-k weights; prime E.
        cfg = transformers.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=24,
                                          shared_expert_intermediate_size=48, num_experts=5, num_experts_per_tok=2,
                                          norm_topk_prob=False, **COMMON)
    elif family == "qwen3_moe":
        # k=3: not a power of two; renormalised top-k.
        cfg = transformers.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=24, num_experts=5,
                                          num_experts_per_tok=3, norm_topk_prob=True, head_dim=8, **COMMON)
    elif family == "olmoe":
        cfg = transformers.OlmoeConfig(intermediate_size=24, num_experts=6, num_experts_per_tok=2, **COMMON)
    else:
        raise AssertionError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


CLASSES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
           "olmoe": "OlmoeForCausalLM"}
FAMILIES = tuple(CLASSES)


def model(family: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    m = getattr(transformers, CLASSES[family])(config(family, **overrides)).float()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0.0, 1.0)
    return m.eval()


def tokens(batch=2, seq=7):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def loss_and_grads(m, ids):
    """Output and every parameter gradient of LM loss + router aux loss."""
    m.zero_grad(set_to_none=True)
    out = m(ids, labels=ids, output_router_logits=True)
    (out.loss + out.aux_loss).backward()
    return out, grads(m)


GREEDY = dict(do_sample=False, pad_token_id=0, cache_implementation="static")


def eager_greedy(m, prompt, max_new_tokens=5):
    """Greedy generation with a static cache, not compiled: the reference of compiled_greedy."""
    return m.generate(prompt, max_new_tokens=max_new_tokens, disable_compile=True, **GREEDY)


def compiled_greedy(m, prompt, max_new_tokens=5):
    """Greedy generation with a static cache and the forward compiled with fullgraph=True (aot_eager:
    AOTAutograd without a C++ compiler); returns (tokens, graphs compiled)."""
    from torch._dynamo.backends.debugging import aot_eager

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    cc = transformers.CompileConfig(fullgraph=True, dynamic=False, backend=backend, mode=None)
    cc._compile_all_devices = True  # transformers compiles on CUDA only unless told
    torch._dynamo.reset()
    out = m.generate(prompt, max_new_tokens=max_new_tokens, compile_config=cc, **GREEDY)
    torch._dynamo.reset()
    return out, graphs


# --- the experts modules of issue 26's families ------------------------------------------------------
#
# One experts module per family whose experts are not a plain SwiGLU / GeGLU / ReLU MLP in
# transformers 5.25: family -> (modeling class, config class). Built alone from the family's own
# (text) config with tiny sizes, E = 5 and non-default gate constants, so the clamp and the caps
# are hit by N(0, 1) inputs and a constant read from the wrong place shows.
LAYOUT_EXPERTS = {
    "gpt_oss": ("GptOssExperts", "GptOssConfig"),
    "openai_privacy_filter": ("OpenAIPrivacyFilterExperts", "OpenAIPrivacyFilterConfig"),
    "minimax_m3_vl": ("MiniMaxM3VLExperts", "MiniMaxM3VLTextConfig"),
    "deepseek_v4": ("DeepseekV4Experts", "DeepseekV4Config"),
    "hy_v4": ("HYV4Experts", "HYV4Config"),
    "hy_v4_vl": ("HYV4VLExperts", "HYV4VLTextConfig"),
    "glm5_next": ("Glm5NextTextExperts", "Glm5NextTextConfig"),
    "bailing_hybrid": ("BailingHybridExperts", "BailingHybridConfig"),
    "step3p7": ("Step3p7Experts", "Step3p7TextConfig"),
    "beam": ("BeamExperts", "BeamConfig"),
    "inkling2": ("Inkling2Experts", "Inkling2TextConfig"),
    "inkling2_loop": ("Inkling2LoopExperts", "Inkling2LoopTextConfig"),
    "gemma4": ("Gemma4TextExperts", "Gemma4TextConfig"),
    "diffusion_gemma": ("DiffusionGemmaTextExperts", "DiffusionGemmaTextConfig"),
    "nemotron_h": ("NemotronHExperts", "NemotronHConfig"),
    "ergo": ("ErgoExperts", "ErgoConfig"),
    "muse_spark": ("MuseSparkExperts", "MuseSparkTextConfig"),
}
EXPERTS_H, EXPERTS_F, EXPERTS_E = 16, 8, 5
_SIZES = dict(hidden_size=EXPERTS_H, moe_hidden_size=EXPERTS_H, intermediate_size=EXPERTS_F,
              moe_intermediate_size=EXPERTS_F, num_local_experts=EXPERTS_E, num_experts=EXPERTS_E,
              n_routed_experts=EXPERTS_E, num_hidden_layers=2)
# Gate constants set away from the defaults (read back by the test from the same config).
_CONSTANTS = dict(swiglu_limit=2.5, swiglu_alpha=1.3, mlp_gate_softcap=1.5, mlp_up_softcap=2.0)


def experts_config(family: str, **overrides):
    """The family's tiny config (importorskip-style: None when this transformers lacks it)."""
    import importlib

    try:
        cfgmod = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
    except ImportError:
        return None
    cfg = getattr(cfgmod, LAYOUT_EXPERTS[family][1])()
    for k, v in {**_SIZES, **_CONSTANTS, **overrides}.items():
        if hasattr(cfg, k) or k in overrides:
            setattr(cfg, k, v)
    return cfg


def experts(family: str, layer_idx: int = 0, **overrides) -> nn.Module:
    """The family's experts module from experts_config, parameters N(0, 0.5) (norm scales 1 +
    N(0, 0.1)), experts implementation "eager" (transformers' own loop)."""
    import importlib
    import inspect

    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    cls = getattr(mod, LAYOUT_EXPERTS[family][0])
    cfg = experts_config(family, **overrides)
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    takes_layer = "layer_idx" in inspect.signature(cls.__init__).parameters
    m = cls(cfg, layer_idx) if takes_layer else cls(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape))
            else:
                p.normal_(0.0, 0.5)
    return m.float()


def routing(tokens: int = 9, k: int = 3, num_experts: int = EXPERTS_E, seed: int = 2):
    """(x [T, H], distinct expert ids [T, k] int64, weights [T, k]) for an experts call."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, EXPERTS_H, generator=g)
    ids = torch.rand(tokens, num_experts, generator=g).argsort(dim=1)[:, :k]
    return x, ids, torch.rand(tokens, k, generator=g)
