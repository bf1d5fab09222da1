"""The main job's subcommands (`python -m unimoe_kernels ...`), one module each."""
