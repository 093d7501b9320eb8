"""Throughput of plain sampling vs head-guided decoding on SmolLM2-135M-Instruct.

    python benchmarks/bench_guided.py [--repeats 3] [--head_dir DIR]

16 AlpacaEval instructions, 64 new tokens each, one batch of 16, top-k 50,
top-p 0.9. Guided decoding scores C = 5 candidates every N = 5 tokens. Plain
and guided runs alternate (plain, guided, plain, guided, ...), so load from
other jobs on a shared machine hits both alike. The median of the repeats is
reported. Without ``--head_dir`` the head is a random
attention-pooled head of the right shape: its weights do not change the cost.
Target: guided throughput >= 0.6x plain.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from coala.backbone import ensure_converted_smollm2  # noqa: E402
from coala.data import offline_data_dir  # noqa: E402
from coala.guided import GuidanceConfig, PreferenceHead, generate_token_ids  # noqa: E402
from coala.head import HeadParams, save_head  # noqa: E402
from coala.pooling import make_attn_scorer  # noqa: E402

ALPACA_OUTPUTS = offline_data_dir() / "alpaca_eval" / "gpt4_1106_preview_model_outputs.json.gz"


def load_instructions(count: int) -> list[str]:
    """Return the first ``count`` AlpacaEval instructions (a fixed list when the shared file is absent)."""
    if ALPACA_OUTPUTS.is_file():
        with gzip.open(ALPACA_OUTPUTS, "rt", encoding="utf-8") as handle:
            records = json.load(handle)
        return [record["instruction"] for record in records[:count]]
    return [f"Explain idea number {index} to a curious student in a few sentences." for index in range(count)]


def random_head(directory: Path, hidden_size: int, neurons: int = 20) -> Path:
    rng = np.random.default_rng(0)
    params = HeadParams(
        theta1=(rng.normal(size=(hidden_size, neurons)) / np.sqrt(hidden_size)).astype(np.float32),
        theta2=rng.normal(size=neurons).astype(np.float32),
        feature_mean=np.zeros(hidden_size, np.float32),
        feature_std=np.ones(hidden_size, np.float32),
        config={"stage": "benchmark", "pooling": {"pool": "attn", "pool_span": "all", "max_length": 512,
                                                   "hidden_size": hidden_size, "model_name": "SmolLM2-135M-Instruct",
                                                   "chat_template": True}},
        attn_scorer=make_attn_scorer(hidden_size, 0),
    )
    return save_head(directory, params)


def timed_run(model, tokenizer, prompts, head, config, args) -> tuple[float, int]:
    started = time.perf_counter()
    tokens = generate_token_ids(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                head=head, config=config, batch_size=args.batch_size)
    return time.perf_counter() - started, sum(len(row) for row in tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=None, help="Converted model folder (default: SmolLM2-135M-Instruct from the offline GGUF).")
    parser.add_argument("--head_dir", default=None, help="A head folder to guide with (default: a random head of the right shape).")
    parser.add_argument("--prompts", type=int, default=16, help="Number of instructions.")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="New tokens per prompt.")
    parser.add_argument("--batch_size", type=int, default=16, help="Prompts per batch.")
    parser.add_argument("--repeats", type=int, default=3, help="Alternating plain/guided pairs of runs.")
    parser.add_argument("--guide_every", type=int, default=5, help="N: tokens between head applications.")
    parser.add_argument("--num_candidates", type=int, default=5, help="C: candidates scored per head application.")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(os.environ.get("COALA_TEST_CACHE", Path.home() / ".cache" / "coala-tests"))
    model_path = Path(args.model_path) if args.model_path else ensure_converted_smollm2(cache)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    head_dir = Path(args.head_dir) if args.head_dir else random_head(REPO_ROOT / "benchmarks" / "cache" / "random_head", model.config.hidden_size)
    head = PreferenceHead.from_dir(head_dir, model, tokenizer)
    prompts = load_instructions(args.prompts)
    config = GuidanceConfig(guidance_scale=1.0, guide_every=args.guide_every, num_candidates=args.num_candidates)

    # Warm-up, then alternate plain and guided runs.
    timed_run(model, tokenizer, prompts[:2], head, config, argparse.Namespace(**{**vars(args), "max_new_tokens": 4}))
    rates = {"plain": [], "guided": []}
    for repeat in range(args.repeats):
        for name, run_head in (("plain", None), ("guided", head)):
            seconds, tokens = timed_run(model, tokenizer, prompts, run_head, config, args)
            rates[name].append(tokens / seconds)
            print(f"repeat {repeat + 1} {name:6s}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tokens/s", flush=True)

    plain, guided = statistics.median(rates["plain"]), statistics.median(rates["guided"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print(f"median plain  {plain:.1f} tokens/s")
    print(f"median guided {guided:.1f} tokens/s (N={args.guide_every}, C={args.num_candidates})")
    print(f"guided / plain = {guided / plain:.2f} (target >= 0.6)")


if __name__ == "__main__":
    main()
