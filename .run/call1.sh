#!/usr/bin/env bash
# Lent-GPU call 1: kernel checks, 48B decode + cold start (records Triton tuning), profile.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $OUT/setup.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
R=/tmp/res; mkdir -p $R
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, triton, transformers, fla, peft; print(torch.__version__, triton.__version__, transformers.__version__, fla.__version__, peft.__version__)"; } >> $OUT/setup.log 2>&1
T=$(date +%s)
timeout 210 python3 bench/gpu_check.py --only mla,moe,kdastep,guard --out $R/check > $OUT/check.log 2>&1; echo "check rc=$? $(( $(date +%s) - T ))s" >> $OUT/setup.log
T=$(date +%s)
timeout 250 python3 bench/gpu_scale.py --parts cold,decode --new-tokens 16 --record-tuning $OUT/triton_tuned_configs.json --out $R/scale > $OUT/scale.log 2>&1; echo "scale rc=$? $(( $(date +%s) - T ))s" >> $OUT/setup.log
T=$(date +%s)
timeout 110 python3 bench/gpu_profile.py --contexts 4096,1048576 --steps 4 --out $R/profile > $OUT/profile.log 2>&1; echo "profile rc=$? $(( $(date +%s) - T ))s" >> $OUT/setup.log
tar czf $OUT/results.tgz -C /tmp res
