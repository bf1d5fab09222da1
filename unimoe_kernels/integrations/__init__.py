"""Drop-in integrations with other trainers' stacks.

- `integrations.transformers`: importing it registers experts_implementation="unimoe" in
  transformers' ExpertsInterface (`experts_interface.py`: any v5 experts module on this package's
  kernels, PEFT target_parameters LoRA included); `patch_moe(model)` swaps the experts of
  Hugging Face transformers MoE blocks (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, any v5 experts module)
  for this package's GroupedExperts on the same weight tensors, optionally with per-expert LoRA;
  `unpatch_moe` undoes it.
- `integrations.peft`: LoRA adapters on MoE experts in and out of PEFT's formats (target_parameters
  on 3-D expert tensors, and per-expert nn.Linear LoRA as Uni-MoE trains it).

No submodule is imported here: each imports transformers / peft only when used, so
`import unimoe_kernels` never pulls them in.
"""

__all__ = ["transformers", "peft", "experts_interface"]
