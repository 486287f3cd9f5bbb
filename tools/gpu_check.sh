#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see README "Benchmarks"): versions, the numerics suites on the GPU,
# and the MoE backend benchmark at a GPU-sized shape. Output goes to $OUT/gpu_log.txt (or stdout).
set -u
log=${OUT:-/tmp}/gpu_log.txt
export PYTHONPATH=$PWD JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__); print(jax.devices())"
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_parity.py tests/test_grouped_matmul.py tests/test_model.py 2>&1 | tail -25
  timeout 120 python3 tools/bench_moe.py --tokens 16384 --hidden 2048 --ffn 4096 --experts 16 --dtype bfloat16 --repeats 10
  timeout 60 python3 tools/bench_moe.py --tokens 16384 --hidden 2048 --ffn 4096 --experts 16 --top-k 2 --dtype bfloat16 --repeats 10
} 2>&1 | tee "$log"
