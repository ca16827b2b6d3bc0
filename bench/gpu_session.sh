#!/usr/bin/env bash
# One call on the lent GPU machine: set up, then run bench/run.py --suite gpu once per STAGE, each under its own
# time limit, and keep in $OUT what comes back (one results JSON per stage and the log).
#
#   here, once:   bash ../shared/tools/device-bundle.sh   (Ray, Optuna, MONAI... as .devbundle/)
#                 pip download timm==<our version> into .whl/ (the machine's own timm may predate the dinov3 models)
#   device call:  carry [".devbundle", ".whl"], command: bash bench/gpu_session.sh SECONDS:ARGS [SECONDS:ARGS ...]
#   e.g.          bash bench/gpu_session.sh "60:--cases flops" "300:--cases model_step --shape dinov3-base=8x32"
#
# Each stage writes its rows into its own results file ($OUT/gpu-<n>.json, merged here afterwards with
# `python bench/run.py --suite gpu --merge FILE...`, which keeps every stored row of another preset, input or
# variant) so that one stage killed at its limit loses only what it had not finished. The call's own limit is
# 600 s: keep the stages' SECONDS summed to <= ~540 (the set-up above takes the rest).
set -uo pipefail
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
out=${OUT:-/tmp/out}
mkdir -p "$out"
log="$out/session.log"
{
  bash .devbundle/install.sh
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  fi
} 2>&1 | tee -a "$log"
export PYTHONPATH=/tmp/site:$PWD/platform:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv 2>&1 \
  | tee -a "$log"
python3 -c "import torch, timm, peft, ray, monai; print('torch', torch.__version__, 'timm', timm.__version__,
'peft', peft.__version__, 'ray', ray.__version__, 'monai', monai.__version__, torch.cuda.get_device_name())" \
  2>&1 | tee -a "$log"
n=0
for stage in "$@"; do
  n=$((n + 1))
  limit=${stage%%:*}
  args=${stage#*:}
  echo "=== stage $n (limit ${limit}s): $args" | tee -a "$log"
  start=$(date +%s)
  # --deadline: the step cases skip a variant (and the suite a case) that would not finish 15 s before the limit;
  # results are written after every case and step shape, so a stage killed at its limit keeps what it finished
  # shellcheck disable=SC2086  # ARGS is a word list on purpose
  timeout --kill-after=10 "$limit" python3 bench/run.py --suite gpu $args --deadline $((start + limit - 15)) \
    --results "$out/gpu-$n.json" --md "/tmp/BENCHMARKS-$n.md" 2>&1 | tee -a "$log"
  echo "=== stage $n: exit ${PIPESTATUS[0]} after $(($(date +%s) - start)) s" | tee -a "$log"
done
