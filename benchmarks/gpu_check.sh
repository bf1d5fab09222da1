#!/usr/bin/env bash
# The GPU check in one short GPU slot: build _C, GPU tests, full-size layer and grouped_mlp
# benchmarks against every baseline and anchor, one side-by-side table last. From the repo root:
#
#     bash benchmarks/gpu_check.sh [options]        options: python -m benchmarks.gpu_check --help
#
# Output folder: $OUT when set, else benchmarks/results/gpu_check (logs, junit XML, JSON, the
# table in summary.txt). The stages and their time limits are in benchmarks/gpu_check.py; without
# CUDA, or with UNIMOE_GPU_CHECK_DRY=1, it is a dry run at the tiny sizes on CPU.
set -u
cd "$(dirname "$0")/.." || exit 2
budget="${UNIMOE_GPU_CHECK_BUDGET:-465}"  # seconds for the stages (the driver's --budget)
# Backstop only: the driver fits its stages in the budget by itself. 15 s past it, SIGTERM makes
# the driver stop the running stage and still print the table; SIGKILL 10 s later if it cannot.
exec timeout -k 10 $((budget + 15)) "${PYTHON:-python}" -m benchmarks.gpu_check --budget "$budget" "$@"
