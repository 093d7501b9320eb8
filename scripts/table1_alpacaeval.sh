#!/usr/bin/env bash
# Regenerate Table 1 (AlpacaEval 2 win rates) of Feng & Pilanci, "Convex Optimization for Alignment and Preference Learning on a Single GPU" (ICML 2026) into ${RESULTS_ROOT:-results}/table1/ (table.md, table.csv).
#
#   SCALE=small bash scripts/table1_alpacaeval.sh    SmolLM2-135M on CPU, offline (default)
#   SCALE=paper bash scripts/table1_alpacaeval.sh    the paper's models on a GPU; needs the hub
#   SCALE=ci    bash scripts/table1_alpacaeval.sh    a tiny model in seconds to minutes (tests)

#
# RESULTS_ROOT sets where results go; WORK_DIR where runs are cached (default RESULTS_ROOT/work/runs/SCALE).
set -euo pipefail
# Relative paths in these variables are taken from the caller's folder, before the cd below.
for name in RESULTS_ROOT WORK_DIR VOTES COALA_OFFLINE_DATA; do
  if [ -n "${!name:-}" ] && [ "${!name#/}" = "${!name}" ]; then
    export "$name=$PWD/${!name}"
  fi
done
cd "$(dirname "$0")/.."
scale="${SCALE-small}"  # an empty SCALE reaches reproduce.py, which rejects it
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-$([ "$scale" = paper ] && echo 0 || echo 1)}"
args=(table1 --scale "$scale" --results_root "${RESULTS_ROOT:-results}")
[ -n "${WORK_DIR:-}" ] && args+=(--work_dir "$WORK_DIR")

exec python scripts/reproduce.py "${args[@]}"
