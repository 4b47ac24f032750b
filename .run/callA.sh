#!/usr/bin/env bash
# Lent-GPU call A (H100): kernel checks, graph decode with the kernels in the model, cold start (records tuning).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $OUT/setup.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
R=/tmp/res; mkdir -p $R
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, triton, transformers, fla, peft; print(torch.__version__, triton.__version__, transformers.__version__, fla.__version__, peft.__version__)"; } >> $OUT/setup.log 2>&1
T=$(date +%s)
timeout 230 python3 bench/gpu_check.py --only mla,moe,kdastep,graph,guard --out $R/check > $OUT/check.log 2>&1; echo "check rc=$? $(( $(date +%s) - T ))s" >> $OUT/setup.log
T=$(date +%s)
timeout 200 python3 bench/gpu_scale.py --parts cold --record-tuning $OUT/triton_tuned_configs.json --out $R/scale > $OUT/scale.log 2>&1; echo "scale rc=$? $(( $(date +%s) - T ))s" >> $OUT/setup.log
tar czf $OUT/results.tgz -C /tmp res
