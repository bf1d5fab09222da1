#!/usr/bin/env bash
# The GPU check in one short GPU slot, one command from the repo root:
#
#     bash benchmarks/gpu_check.sh [options]        options: python -m benchmarks.gpu_check --help
#
# Stages, headline first: kernels (the five expert GEMMs at qwen3-30b-a3b and mixtral, a process
# per case), layer (ours, torch._grouped_mm, dense, Liger), profile (CUDA time per kernel of one
# layer call), decode, then the GPU tests. Output: $OUT when set, else benchmarks/results/gpu_check
# (summary.txt and summary.json first say which stage ran and where the numbers come from). Without
# CUDA, or with UNIMOE_GPU_CHECK_DRY=1, it is a dry run at small sizes on the CPU.
set -u
cd "$(dirname "$0")/.." || exit 2
budget="${UNIMOE_GPU_CHECK_BUDGET:-420}"  # seconds for the stages (the driver's --budget)
# Backstop only: the driver fits its stages in the budget by itself. 15 s past it, SIGTERM makes
# the driver stop the running stage and still print the tables; SIGKILL 10 s later if it cannot.
exec timeout -k 10 $((budget + 15)) "${PYTHON:-python}" -m benchmarks.gpu_check --budget "$budget" "$@"
