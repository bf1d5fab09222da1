"""Patch a Hugging Face transformers MoE model with unimoe_kernels, add LoRA on every expert, train a
few steps, and save the adapter in PEFT's format.

    python examples/patch_transformers_lora.py                       # tiny random Mixtral, CPU, seconds
    python examples/patch_transformers_lora.py --model Qwen/Qwen3-30B-A3B --steps 20 --device cuda --out adapter/

The adapter goes to --out, or to a new temporary directory (printed) when --out is not given, so
the example never writes into the directory it is run from.

Flow: model (any Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE or other transformers-v5 MoE)
  -> patch_moe(model, lora_rank=8, lora_alpha=16): the experts of every MoE block become
     GroupedExperts on the model's own weight tensors, with per-expert LoRA; expert base frozen
  -> train LoRA (and, as in Uni-MoE, the routers) with the host's own loss + its router aux loss
  -> export_peft_adapter(model, out_dir): adapter_config.json + adapter_model.safetensors that
     PeftModel.from_pretrained(unpatched_model, out_dir) loads (target_parameters layout)
  -> unpatch_moe(model, merge_lora=True) + save_pretrained: a merged model in the host's format
"""

from __future__ import annotations

import argparse
import tempfile

import torch


def build_model(args):
    import transformers

    if args.model:
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        return transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device)
    # A tiny random Mixtral built from a config: no download, runs on CPU.
    cfg = transformers.MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=256,
                                     output_router_logits=True, router_aux_loss_coef=0.01)
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(cfg).to(args.device)


def main():
    from unimoe_kernels.integrations.peft import export_peft_adapter
    from unimoe_kernels.integrations.transformers import patch_moe, unpatch_moe

    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("--model", default=None, help="a Hub id or local path (None: a tiny random Mixtral)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=int, default=10, help="training steps")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank on every expert")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha / rank)")
    parser.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate")
    parser.add_argument("--out", default=None,
                        help="directory the PEFT adapter is written to (None: a new temporary directory)")
    args = parser.parse_args()
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="moe_lora_adapter_")

    model = build_model(args)
    n = patch_moe(model, lora_rank=args.rank, lora_alpha=args.alpha)
    print(f"patched {n} MoE blocks")
    # Uni-MoE's recipe: LoRA on every expert and the routers train; everything else stays frozen.
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.endswith("mlp.gate.weight"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(f"trainable parameters: {sum(p.numel() for p in trainable):,}")

    opt = torch.optim.AdamW(trainable, lr=args.lr)
    vocab = model.config.vocab_size
    batch = torch.randint(0, vocab, (4, 32), device=args.device, generator=torch.Generator(args.device).manual_seed(1))
    model.train()
    for step in range(args.steps):
        # labels=input_ids: the host's causal-LM loss; with output_router_logits it adds its aux loss.
        out = model(batch, labels=batch, output_router_logits=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        print(f"step {step:3d}  loss {out.loss.item():.4f}")

    _, config = export_peft_adapter(model, args.out)
    print(f"PEFT adapter (r={config['r']}, alpha={config['lora_alpha']}) written to {args.out}")
    unpatch_moe(model, merge_lora=True)  # back to the host's own experts, LoRA merged into the weights
    print("unpatched; model.save_pretrained(...) now writes the host's own format with the adapter merged")


if __name__ == "__main__":
    main()
