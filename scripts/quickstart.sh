#!/usr/bin/env bash
# The main job: COALA Stages 1-3 on SmolLM2-135M-Instruct and datasets/edu_sample/, then a summary
# with three guided generations next to plain ones. Runs on CPU, offline.
#
#   bash scripts/quickstart.sh                      the default model and data
#   bash scripts/quickstart.sh MODEL [DATA]         any model (folder, hub id, .gguf) and data
#   MODEL=path/to/model DATA=path/to/data bash scripts/quickstart.sh
#
# Outputs go under QUICKSTART_WORKDIR (default: the repository root): models/, extracted_features/,
# cvxNN_trained_<model>/, Finetuned_cvxmlp_<model>/ (with quickstart_summary.json).
#
# Reduced settings (CI, smoke runs), all optional:
#   QUICKSTART_MAX_PAIRS       extract only the first N pairs            (default: all)
#   QUICKSTART_MAX_LENGTH      max tokens per prompt + response          (default: extract.py's)
#   QUICKSTART_ADMM_ITERS      CRONOS ADMM iterations                    (default: cronos_trainer.py's)
#   QUICKSTART_EPOCHS          COALA fine-tuning epochs                  (default: 500)
#   QUICKSTART_MAX_NEW_TOKENS  tokens per generation in the summary      (default: 64)
#   QUICKSTART_NUM_PROMPTS     prompts generated in the summary          (default: 3)
#   PYTHON                     the Python interpreter                    (default: python)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORKDIR="${QUICKSTART_WORKDIR:-$REPO}"
PYTHON="${PYTHON:-python}"
DEFAULT_MODEL="models/SmolLM2-135M-Instruct"
DEFAULT_DATA="datasets/edu_sample/"
MODEL="${1:-${MODEL:-$DEFAULT_MODEL}}"
DATA="${2:-${DATA:-$DEFAULT_DATA}}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

mkdir -p "$WORKDIR"
cd "$WORKDIR"
if [[ "$DATA" == "$DEFAULT_DATA" && ! -e "$DATA" ]]; then
    DATA="$REPO/$DEFAULT_DATA"
fi
started=$(date +%s)

# The default backbone: dequantize the offline GGUF once into a transformers folder.
if [[ "$MODEL" == "$DEFAULT_MODEL" && ! -f "$MODEL/config.json" ]]; then
    echo "== Converting the offline SmolLM2-135M-Instruct GGUF into $MODEL (once)"
    GGUF="$("$PYTHON" -c 'from coala.backbone import find_smollm2_gguf; print(find_smollm2_gguf())')"
    "$PYTHON" -m coala.backbone convert "$GGUF" "$MODEL"
fi

MODEL_NAME="$("$PYTHON" -c 'import sys; from coala.features import model_name_from_path; print(model_name_from_path(sys.argv[1]))' "$MODEL")"
DATASET_NAME="$("$PYTHON" -c 'import sys; from coala.features import dataset_name_from_path; print(dataset_name_from_path(sys.argv[1]))' "$DATA")"

extract_extra=()
cronos_extra=()
finetune_extra=()
[[ -n "${QUICKSTART_MAX_PAIRS:-}" ]] && extract_extra+=(--max_pairs "$QUICKSTART_MAX_PAIRS")
[[ -n "${QUICKSTART_MAX_LENGTH:-}" ]] && extract_extra+=(--max_length "$QUICKSTART_MAX_LENGTH")
[[ -n "${QUICKSTART_ADMM_ITERS:-}" ]] && cronos_extra+=(--admm_iters "$QUICKSTART_ADMM_ITERS")
[[ -n "${QUICKSTART_EPOCHS:-}" ]] && finetune_extra+=(--epochs "$QUICKSTART_EPOCHS")

# Stage 1: pooled last-layer features of every (prompt + response).
echo "== Stage 1: extract.py"
"$PYTHON" "$REPO/extract.py" --model_path "$MODEL" --data_path "$DATA" --pool attn \
    --output_base extracted_features/ ${extract_extra[@]+"${extract_extra[@]}"}

# Stage 2: the CRONOS head. The --model_name lookup must find one feature folder;
# --dataset narrows it when features of other data sets for this model exist.
matches="$("$PYTHON" -c 'import sys; from coala.features import find_feature_dirs; print(len(find_feature_dirs("extracted_features/", sys.argv[1])))' "$MODEL_NAME")"
if [[ "$matches" != "1" ]]; then
    cronos_extra+=(--dataset "$DATASET_NAME" --pool attn)
fi
echo "== Stage 2: cronos_trainer.py"
"$PYTHON" "$REPO/cronos_trainer.py" --model_name "$MODEL_NAME" ${cronos_extra[@]+"${cronos_extra[@]}"}

# Stage 3: COALA fine-tuning of theta2.
echo "== Stage 3: finetune_coala.py"
"$PYTHON" "$REPO/finetune_coala.py" --model_path "cvxNN_trained_$MODEL_NAME/" \
    --output_dir "Finetuned_cvxmlp_$MODEL_NAME/" ${finetune_extra[@]+"${finetune_extra[@]}"}

# Summary: pairs, accuracies, margins, and guided vs plain generations.
echo "== Summary"
"$PYTHON" "$REPO/scripts/quickstart_summary.py" \
    --stage2_dir "cvxNN_trained_$MODEL_NAME/" --stage3_dir "Finetuned_cvxmlp_$MODEL_NAME/" --model_path "$MODEL" \
    --max_new_tokens "${QUICKSTART_MAX_NEW_TOKENS:-64}" --num_prompts "${QUICKSTART_NUM_PROMPTS:-3}"
echo "Main job finished in $(( $(date +%s) - started )) s; outputs in $WORKDIR"
