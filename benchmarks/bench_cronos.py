"""Benchmark Stage 2: CRONOS against the AdamW learning-rate search on real SmolLM2-135M features.

Two data sets from ../shared/data:
  - HH-RLHF harmless test pairs: held-out accuracy is near chance with this
    backbone, so the methods are compared by objective value and wall time, and
    CRONOS's relative objective gap to a long float64 run is reported.
  - AlpacaEval preference pairs: validation and test accuracy separate the methods.

Features are mean-pooled last-layer hidden states of prompt + response. They are
written once under --cache_dir (outside the repository) in the Stage 1 feature
folder format and reused on later runs.

    python benchmarks/bench_cronos.py                  # features (cached) + benchmark
    python benchmarks/bench_cronos.py --features_only  # only write the features
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from coala.io import atomic_save_npy, atomic_write_json, atomic_write_text, setup_logging, sha256_file  # noqa: E402

logger = logging.getLogger("bench_cronos")

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
DATASETS = {
    "preference_pairs": SHARED_DATA / "alpaca_eval" / "preference_pairs.jsonl.gz",
    "harmless-base-test": SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz",
}
MODEL_DIR = Path.home() / ".cache" / "coala-tests" / "SmolLM2-135M-Instruct"


# ----------------------------------------------------------------------------------------------
# Features: a direct transformers mean pool in the Stage 1 folder format


def write_mean_pooled_features(
    data_path: Path, output_dir: Path, max_pairs: int, max_length: int, batch_size: int, seed: int = 0
) -> Path:
    """Write mean-pooled SmolLM2 features of ``max_pairs`` pairs of ``data_path`` to ``output_dir``.

    Texts are the chat-template prompt followed by the response, cut from the left
    to ``max_length`` tokens so that the response end is kept. Splits are assigned
    by ``coala.data.assign_split`` on the prompt (80/10/10).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from coala.data import assign_split, load_preferences

    if (output_dir / "manifest.json").is_file():
        logger.info("Reusing cached features in %s", output_dir)
        return output_dir
    data = load_preferences(str(data_path), max_pairs=None)
    rng = np.random.default_rng(seed)
    order = np.sort(rng.permutation(len(data.triplets))[:max_pairs])
    triplets = [data.triplets[i] for i in order]

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, torch_dtype=torch.float32).eval()

    def encode(prompt: str, response: str) -> list[int]:
        prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        if not isinstance(prompt_ids, list):
            prompt_ids = prompt_ids["input_ids"]
        ids = list(prompt_ids) + tokenizer(response, add_special_tokens=False).input_ids
        return ids[-max_length:]

    texts = [encode(t.prompt, t.chosen) for t in triplets] + [encode(t.prompt, t.rejected) for t in triplets]
    features = np.zeros((len(texts), model.config.hidden_size), np.float32)
    by_length = np.argsort([len(ids) for ids in texts])
    start = time.perf_counter()
    real_tokens = 0
    with torch.no_grad():
        for first in range(0, len(texts), batch_size):
            rows = by_length[first : first + batch_size]
            width = max(len(texts[i]) for i in rows)
            ids = torch.full((len(rows), width), tokenizer.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.bool)
            for j, i in enumerate(rows):
                ids[j, : len(texts[i])] = torch.tensor(texts[i])
                mask[j, : len(texts[i])] = True
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            features[rows] = pooled.numpy()
            real_tokens += int(mask.sum())
            if (first // batch_size) % 20 == 0:
                logger.info("%s: %d/%d texts, %.0fs", output_dir.name, first + len(rows), len(texts), time.perf_counter() - start)

    n = len(triplets)
    splits = [assign_split(t.prompt, seed) for t in triplets]
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_save_npy(output_dir / "chosen.npy", features[:n])
    atomic_save_npy(output_dir / "rejected.npy", features[n:])
    meta = "".join(
        json.dumps({"pair_id": t.pair_id, "split": split, "chosen_tokens": len(texts[i]), "rejected_tokens": len(texts[n + i])}) + "\n"
        for i, (t, split) in enumerate(zip(triplets, splits))
    )
    atomic_write_text(output_dir / "meta.jsonl", meta)
    manifest = {
        "format_version": 1,
        "model_name": MODEL_DIR.name,
        "model_path": str(MODEL_DIR),
        "gguf_file": None,
        "hidden_size": int(model.config.hidden_size),
        "pool": "mean",
        "pool_span": "all",
        "max_length": max_length,
        "dtype": "float32",
        "chat_template": True,
        "data_path": str(data_path),
        "data_sha256": sha256_file(data_path),
        "split_seed": seed,
        "paired": True,
        "counts": {"pairs": n, **{name: splits.count(name) for name in ("train", "validation", "test")}},
        "tokens": {"real": real_tokens},
        "seconds": time.perf_counter() - start,
        "writer": "benchmarks/bench_cronos.py direct mean pool",
    }
    atomic_write_json(output_dir / "manifest.json", manifest)
    logger.info("Wrote %s (%d pairs) in %.0fs", output_dir, n, manifest["seconds"])
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache_dir", type=Path, default=Path("/tmp/coala_bench_features"), help="feature cache folder")
    parser.add_argument("--max_pairs", type=int, default=1200, help="pairs sampled per data set")
    parser.add_argument("--max_length", type=int, default=128, help="tokens per text (prompt cut from the left)")
    parser.add_argument("--batch_size", type=int, default=16, help="texts per forward pass")
    parser.add_argument("--features_only", action="store_true", help="write the features and stop")
    args = parser.parse_args()
    setup_logging()

    folders = {}
    for name, path in DATASETS.items():
        folder = args.cache_dir / f"{MODEL_DIR.name}__{name}__mean"
        folders[name] = write_mean_pooled_features(path, folder, args.max_pairs, args.max_length, args.batch_size)
    if args.features_only:
        return


if __name__ == "__main__":
    main()
