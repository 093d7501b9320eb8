"""Stage 1: embed every (prompt + response) text with a frozen LM and save pooled last-layer features.

    python extract.py --model_path M --data_path D --pool attn --output_base extracted_features/

writes ``extracted_features/<model>__<data>__<pool>[-response]/`` with chosen.npy,
rejected.npy, meta.jsonl, manifest.json (and attn_scorer.safetensors for --pool attn).
With --pool none the per-token features go to chosen_tokens.npy / rejected_tokens.npy
with row offsets in chosen_offsets.npy / rejected_offsets.npy. The Stage 2 head
cannot read that folder because it needs one vector per text; it is meant for analysis.

A killed run continues where it stopped when started again with the same arguments.
"""

from __future__ import annotations

import argparse
import datetime
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coala.config import (
    add_config_flag,
    namespace_to_dict,
    parse_args_with_config,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Stage 1: extract pooled last-layer features of a frozen LM.")
    add_config_flag(parser)
    parser.add_argument("--model_path", required=True, help="Hugging Face id, local model folder, .gguf file, folder with --gguf_file, or PEFT adapter folder")
    parser.add_argument("--gguf_file", default=None, help="GGUF file name inside --model_path")
    parser.add_argument("--data_path", default="datasets/edu_sample/", help="preference data: folder, JSON/JSONL(.gz) file or Hugging Face dataset id")
    parser.add_argument("--hf_split", default="train", help="split of a Hugging Face dataset id (ignored for local data)")
    parser.add_argument("--max_pairs", type=int, default=None, help="keep only the first N pairs (or texts); default all")
    parser.add_argument("--drop_empty", action="store_true", help="drop triplets with an empty prompt, chosen or rejected text (counted) instead of stopping with an error")
    parser.add_argument("--pool", default="attn", choices=["attn", "mean", "last", "none"], help="pooling of the last-layer hidden states; none keeps every token")
    parser.add_argument("--pool_span", default="all", choices=["all", "response"], help="tokens pooled: the whole sequence, or only the response")
    parser.add_argument("--attn_seed", type=int, default=0, help="seed of the attn pooling scorer vector")
    parser.add_argument("--max_length", type=int, default=512, help="max tokens per prompt + response; the prompt is cut from the left first")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences per forward pass (batches are bucketed by length)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="model dtype; auto = bfloat16 on a CUDA GPU that supports it, else float32")
    parser.add_argument("--device", default="auto", help="torch device (cpu, cuda, cuda:1); auto = cuda if available")
    parser.add_argument("--split_seed", type=int, default=0, help="seed of the prompt-hash train/validation/test split")
    parser.add_argument("--split_fractions", type=float, nargs=3, default=[0.8, 0.1, 0.1], metavar=("TRAIN", "VALIDATION", "TEST"), help="split fractions, summing to 1")
    parser.add_argument("--output_base", default="extracted_features/", help="folder under which the feature folder is created")
    parser.add_argument("--output_dir", default=None, help="explicit feature folder, overriding the <model>__<data>__<pool> name under --output_base")
    parser.add_argument("--overwrite", action="store_true", help="delete a finished or unfinished extraction in the output folder and start over")
    parser.add_argument("--verbose", action="store_true", help="log debug messages")
    return parser


def check_settings(args: argparse.Namespace) -> None:
    """Raise ExtractionError for settings that cannot work, before anything is loaded."""
    from coala.data import validate_split_fractions
    from coala.extraction import ExtractionError

    if args.max_length <= 0:
        raise ExtractionError(f"--max_length must be a positive number of tokens, got {args.max_length}.")
    if args.batch_size <= 0:
        raise ExtractionError(f"--batch_size must be positive, got {args.batch_size}.")
    if args.max_pairs is not None and args.max_pairs <= 0:
        raise ExtractionError(f"--max_pairs must be positive (or omitted for all pairs), got {args.max_pairs}.")
    try:
        args.split_fractions = list(validate_split_fractions(args.split_fractions))
    except ValueError as error:
        raise ExtractionError(f"--split_fractions: {error}") from error


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import torch
    import transformers
    from tqdm.auto import tqdm

    from coala import backbone, extraction
    from coala.data import assign_split, load_preferences
    from coala.features import (
        dataset_name_from_path,
        feature_dir_name,
        model_name_from_path,
    )
    from coala.io import read_json, setup_logging
    from coala.pooling import make_attn_scorer

    # Settings: flags over YAML (section "extract"), checked before anything is loaded
    args = parse_args_with_config(build_parser(), argv, section="extract")
    setup_logging(args.verbose)
    check_settings(args)
    source = backbone.resolve_model_source(args.model_path, args.gguf_file)
    max_positions = backbone.read_max_positions(source)
    if max_positions is not None and args.max_length > max_positions:
        raise extraction.ExtractionError(
            f"--max_length {args.max_length} exceeds the model's {max_positions} positions; pass --max_length {max_positions} or less."
        )
    device = backbone.resolve_device(args.device)
    dtype = backbone.resolve_dtype(args.dtype, device)
    started = time.perf_counter()

    # Data: loading validates every record, so bad data stops the run before the model loads
    data = load_preferences(args.data_path, max_pairs=args.max_pairs, hf_split=args.hf_split, drop_empty=args.drop_empty)
    dropped_identical_source = sum(count for reason, count in data.dropped.items() if "identical" in reason)

    # Output folder and the settings fingerprint that a resumed run must match
    model_name = model_name_from_path(args.model_path, args.gguf_file)
    if args.output_dir:
        output_dir = Path(args.output_dir)
    else:
        output_dir = Path(args.output_base) / feature_dir_name(model_name, dataset_name_from_path(args.data_path), args.pool, args.pool_span)
    settings = {
        "format_version": extraction.FORMAT_VERSION,
        "model_fingerprint": backbone.model_fingerprint(args.model_path, args.gguf_file),
        "data_sha256": data.content_hash,
        "max_pairs": args.max_pairs,
        "drop_empty": args.drop_empty,
        "pool": args.pool,
        "pool_span": args.pool_span,
        "attn_seed": args.attn_seed if args.pool == "attn" else None,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "dtype": dtype,
        "device_type": torch.device(device).type,
        "split_seed": args.split_seed,
        "split_fractions": args.split_fractions,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    if args.overwrite:
        extraction.clear_outputs(output_dir)
    manifest_path = output_dir / "manifest.json"
    if manifest_path.is_file():
        finished = read_json(manifest_path)
        differences = extraction.describe_differences(finished.get("settings", {}), settings)
        if differences:
            raise extraction.ExtractionError(
                f"{output_dir} already contains a finished extraction with other settings ({differences}). "
                "Pass --overwrite to replace it or --output_dir to write elsewhere."
            )
        print(f"{output_dir} is already complete with these settings; nothing to do (pass --overwrite to extract again).")
        return finished
    store = extraction.ShardStore(output_dir, settings)
    store.open()

    # Tokenize: chat template when the tokenizer has one; truncation keeps the response
    tokenizer = backbone.load_tokenizer(args.model_path, args.gguf_file)
    encoded = extraction.encode_preferences(tokenizer, data, args.max_length, progress=True)
    lengths = [example.length for example in encoded.examples]
    batches = extraction.plan_batches(lengths, args.batch_size)
    real_tokens, padded_tokens = extraction.padding_counts(lengths, batches)

    # Model: frozen, eval mode, on the device
    model, _ = backbone.load_backbone(args.model_path, args.gguf_file, dtype=dtype, device=device)
    shape = backbone.describe_model(model)
    scorer = make_attn_scorer(shape["hidden_size"], args.attn_seed) if args.pool == "attn" else None

    # Forward passes in length-sorted batches, each committed as a shard
    units = len(encoded.records)
    per_sequence = 0.5 if encoded.paired else 1.0
    with tqdm(total=units, desc="extract", unit="pair" if encoded.paired else "text") as bar:

        def advance(batch_index: int, batch_len: int) -> None:
            bar.update(batch_len * per_sequence)

        extraction.run_batches(
            model, encoded, batches, store, args.pool, args.pool_span, scorer,
            extraction.pad_token_id(tokenizer), device, on_batch=advance,
        )

    # Outputs: arrays in input order, meta, scorer, then the manifest last
    if args.pool == "none":
        features = extraction.gather_tokens(store, batches, len(encoded.examples))
    else:
        features = extraction.gather_pooled(store, batches, len(encoded.examples))
    splits = [assign_split(record["_split_key"], args.split_seed, args.split_fractions) for record in encoded.records]
    compute_seconds = sum(store.seconds(index) for index in range(len(batches)))
    manifest = {
        "format_version": extraction.FORMAT_VERSION,
        "model_name": model_name,
        "model_path": str(args.model_path),
        "gguf_file": args.gguf_file,
        "model_fingerprint": settings["model_fingerprint"],
        **shape,
        "pool": args.pool,
        "pool_span": args.pool_span,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "dtype": dtype,
        "device": device,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "data_path": str(args.data_path),
        "data_format": data.format,
        "data_sha256": data.content_hash,
        "split_seed": args.split_seed,
        "split_fractions": args.split_fractions,
        "paired": encoded.paired,
        "counts": {"dropped_identical_source": dropped_identical_source},
        "tokens": {"real": real_tokens, "padded": padded_tokens},
        # NOTE: counts every parameter, including the output layer that extraction skips.
        "flops": 2 * shape["num_parameters"] * real_tokens,
        "attn_scorer_seed": args.attn_seed if args.pool == "attn" else None,
        "seconds": round(compute_seconds, 3),
        "wall_seconds_last_run": round(time.perf_counter() - started, 3),
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": settings["versions"],
        "settings": settings,
        "arguments": namespace_to_dict(args),
    }
    counts = extraction.write_feature_folder(output_dir, encoded, features, splits, args.pool, scorer, manifest)
    store.remove()
    manifest["counts"] = counts

    # Summary
    unit = "pairs" if encoded.paired else "texts"
    print(
        f"Extracted {units} {unit} ({counts['train']} train, {counts['validation']} validation, {counts['test']} test) "
        f"with {model_name}, pool={args.pool}, span={args.pool_span}.\n"
        f"Dropped: {dropped_identical_source} identical in the source, {encoded.dropped_identical_tokens} identical after "
        f"tokenization; truncated: {counts['truncated']}.\n"
        f"Tokens: {real_tokens} real, {padded_tokens} padding ({padded_tokens / max(real_tokens + padded_tokens, 1):.1%}); "
        f"forward time {compute_seconds:.1f} s, {units / max(compute_seconds, 1e-9):.1f} {unit}/s, "
        f"{real_tokens / max(compute_seconds, 1e-9):.0f} tokens/s.\n"
        f"Features: {output_dir}"
    )
    return manifest


if __name__ == "__main__":
    from coala.cli import run_cli

    run_cli(main, interrupted_hint="Finished batches are saved; rerun the same command to resume.")
