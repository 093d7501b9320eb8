"""Shared set-up of the SFT, DPO and ORPO baselines: flags, data, LoRA, TRL trainers, outputs.

The three scripts under ``baselines/`` train LoRA adapters with TRL (trl 1.16,
peft 0.21) on the same preference data and the same train/validation split
as Stage 1 (``coala.data.load_preferences`` and ``assign_split`` keyed by the
prompt text). SFT trains on prompt + chosen; DPO and ORPO on the pairs.

Each run writes into its output folder:

    adapter_config.json, adapter_model.safetensors   the LoRA adapter (PEFT format)
    tokenizer files                                   copied from the base model
    metrics.json     per-step TRL metrics (train and validation), token counts,
                     analytic FLOPs (``coala.flops``) and TRL's own FLOP count
    run_config.json  every resolved setting
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Sequence

from coala.config import add_config_flag
from coala.io import atomic_write_json

logger = logging.getLogger(__name__)

METHODS = ("sft", "dpo", "orpo")
METRICS_FILE = "metrics.json"
RUN_CONFIG_FILE = "run_config.json"
GPT2_TARGETS = ("c_attn", "c_proj")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class BaselineError(ValueError):
    """Invalid settings or inputs of a baseline run."""


# ---------------------------------------------------------------------------
# Flags


def build_parser(method: str) -> argparse.ArgumentParser:
    """Build the argument parser of ``baselines/train_<method>.py``.

    Defaults are the baseline settings of Feng & Pilanci (ICML 2026), Tables 13
    and 14: LoRA r 16, alpha 32, dropout 0.05; AdamW lr 2e-4, weight decay 0.01;
    micro-batch 2 x accumulation 8; clipping 1.0.
    """
    if method not in METHODS:
        raise BaselineError(f"Unknown baseline method {method!r}; expected one of {METHODS}.")
    parser = argparse.ArgumentParser(description=f"Train the {method.upper()} baseline: a LoRA adapter with TRL.")
    add_config_flag(parser)
    parser.add_argument("--model_path", required=True, help="Hugging Face id or local transformers folder (convert a GGUF file first with `python -m coala.backbone convert`).")
    parser.add_argument("--data_path", required=True, help="Preference data: any source coala.data.load_preferences accepts.")
    parser.add_argument("--output_dir", required=True, help="Folder for the adapter, metrics.json and run_config.json.")

    data = parser.add_argument_group("data")
    data.add_argument("--max_pairs", type=int, default=None, help="Use only the first N pairs of the source (default: all).")
    data.add_argument("--max_eval_pairs", type=int, default=None, help="Evaluate on at most N validation pairs (default: all).")
    data.add_argument("--split_seed", type=int, default=0, help="Seed of the prompt-hash split; the same value as Stage 1 gives the same split.")
    data.add_argument("--split_fractions", type=float, nargs=3, default=[0.8, 0.1, 0.1], metavar=("TRAIN", "VALIDATION", "TEST"), help="Split fractions, summing to 1 (the same as Stage 1's).")
    data.add_argument("--max_length", type=int, default=512, help="Maximum tokens of prompt + response; longer sequences are truncated.")

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora_r", type=int, default=16, help="LoRA rank.")
    lora.add_argument("--lora_alpha", type=int, default=32, help="LoRA scaling alpha.")
    lora.add_argument("--lora_dropout", type=float, default=0.05, help="Dropout on the LoRA input.")
    lora.add_argument("--lora_target_modules", default="auto", help="Comma-separated module names, or 'auto': c_attn,c_proj for GPT-2, q/k/v/o/gate/up/down projections otherwise.")

    optim = parser.add_argument_group("optimizer")
    optim.add_argument("--learning_rate", type=float, default=2e-4, help="AdamW peak learning rate.")
    optim.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    optim.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    optim.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    optim.add_argument("--weight_decay", type=float, default=0.01, help="AdamW decoupled weight decay.")
    optim.add_argument("--warmup_steps", type=float, default=0.1, help="Linear warmup: steps (>= 1) or a fraction of all steps (< 1). The paper used 1000 steps on its full data sets.")
    optim.add_argument("--lr_scheduler_type", default="linear", help="Decay after warmup (a transformers scheduler name).")
    optim.add_argument("--per_device_train_batch_size", type=int, default=2, help="Micro-batch size in pairs (or sequences for SFT).")
    optim.add_argument("--per_device_eval_batch_size", type=int, default=2, help="Evaluation batch size.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=8, help="Micro-batches per optimizer step.")
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    optim.add_argument("--num_train_epochs", type=float, default=1.0, help="Epochs over the training split.")
    optim.add_argument("--max_steps", type=int, default=-1, help="Stop after N optimizer steps (-1: run the epochs).")

    run = parser.add_argument_group("run")
    run.add_argument("--eval_steps", type=int, default=0, help="Evaluate on the validation split every N steps (0: only at the end).")
    run.add_argument("--logging_steps", type=int, default=1, help="Log TRL's metrics every N steps.")
    run.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="auto: bf16 on a GPU that supports it, else fp32.")
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="Training device.")
    run.add_argument("--seed", type=int, default=0, help="Seed of LoRA initialisation, shuffling and dropout.")

    if method in ("dpo", "orpo"):
        name = "DPO's beta (KL strength; the paper searched 0.01, 0.05, 0.1)" if method == "dpo" else "ORPO's lambda, the odds-ratio weight, TRL's beta (the paper searched 0.1, 0.5, 1.0, 2.0)"
        parser.add_argument("--beta", type=float, default=0.1, help=name + ".")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Raise ``BaselineError`` naming the first invalid setting."""
    from coala.data import validate_split_fractions

    positive = ("lora_r", "lora_alpha", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "max_length", "logging_steps")
    for name in positive:
        if getattr(args, name) <= 0:
            raise BaselineError(f"--{name} must be positive, got {getattr(args, name)}.")
    if args.learning_rate <= 0:
        raise BaselineError(f"--learning_rate must be positive, got {args.learning_rate}.")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise BaselineError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}.")
    if args.max_pairs is not None and args.max_pairs < 2:
        raise BaselineError(f"--max_pairs must be at least 2, got {args.max_pairs}.")
    try:
        validate_split_fractions(args.split_fractions)
    except ValueError as error:
        raise BaselineError(f"--split_fractions: {error}") from error
    if getattr(args, "beta", 1.0) <= 0:
        raise BaselineError(f"--beta must be positive, got {args.beta}.")
    if str(args.model_path).lower().endswith(".gguf"):
        raise BaselineError(
            f"--model_path {args.model_path} is a GGUF file; TRL rejects GGUF-quantized models. "
            "Convert it once with `python -m coala.backbone convert` and pass the converted folder."
        )


# ---------------------------------------------------------------------------
# Data


def load_pair_splits(data_path: str, split_seed: int, max_pairs: int | None, seed: int, split_fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Load preference pairs and split them as Stage 1 does (``assign_split`` of ``split_key``).

    Returns ``(splits, info)``: ``splits`` maps "train", "validation", "test"
    to records with ``prompt``, ``chosen``, ``rejected``, ``pair_id`` and
    ``prompt_messages``. Unpaired data (positive and negative texts) is split
    text by text and then paired within each split by a shuffle seeded with
    ``seed``; ``info["paired"]`` says which happened.
    """
    from coala.data import assign_split, load_preferences, split_key

    data = load_preferences(data_path, max_pairs=max_pairs)
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "validation": [], "test": []}
    if data.paired:
        for t in data.triplets:
            record = {"prompt": t.prompt, "chosen": t.chosen, "rejected": t.rejected, "pair_id": t.pair_id, "prompt_messages": t.prompt_messages}
            splits[assign_split(split_key(t), split_seed, split_fractions)].append(record)
    else:
        texts: dict[str, list[Any]] = {name: [] for name in splits}
        for text in data.texts:
            texts[assign_split(split_key(text), split_seed, split_fractions)].append(text)
        for name in splits:
            splits[name] = pair_unpaired_texts(texts[name], seed)
        logger.info("%s is unpaired; paired positive with negative texts by a shuffle seeded with %d", data_path, seed)

    total = sum(len(v) for v in splits.values())
    if not splits["train"]:
        raise BaselineError(f"The train split of {data_path} is empty ({total} pairs, --split_seed {split_seed}); use more pairs.")
    info = {"source": data_path, "format": data.format, "paired": data.paired, "content_hash": data.content_hash, "dropped": dict(data.dropped), "counts": {k: len(v) for k, v in splits.items()}}
    return splits, info


def pair_unpaired_texts(texts: Sequence[Any], seed: int) -> list[dict[str, Any]]:
    """Pair each positive text with a negative one after a seeded shuffle of both (the shorter list sets the count)."""
    rng = random.Random(seed)
    positive = [t for t in texts if t.label > 0]
    negative = [t for t in texts if t.label < 0]
    rng.shuffle(positive)
    rng.shuffle(negative)
    return [
        {"prompt": pos.prompt, "chosen": pos.text, "rejected": neg.text, "pair_id": f"{pos.text_id}|{neg.text_id}", "prompt_messages": None}
        for pos, neg in zip(positive, negative)
    ]


def to_trl_records(records: Sequence[dict[str, Any]], method: str, conversational: bool) -> list[dict[str, Any]]:
    """Turn pairs into TRL's dataset rows.

    With a chat template (``conversational``), prompts become user turns (or
    the source's own messages) and responses assistant turns, so TRL renders
    them with the tokenizer's chat template as Stage 1 does. Without one the
    texts are concatenated. SFT rows have ``prompt`` and ``completion``
    (the chosen response), DPO and ORPO rows ``prompt``, ``chosen``, ``rejected``.
    """
    rows = []
    for record in records:
        if conversational:
            messages = record.get("prompt_messages")
            prompt: Any = [dict(m) for m in messages] if messages else [{"role": "user", "content": record["prompt"]}]
            chosen: Any = [{"role": "assistant", "content": record["chosen"]}]
            rejected: Any = [{"role": "assistant", "content": record["rejected"]}]
        else:
            prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
        if method == "sft":
            rows.append({"prompt": prompt, "completion": chosen})
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def truncate_prompts(tokenizer: Any, records: Sequence[dict[str, Any]], max_length: int, template_tokens: int = 16) -> tuple[list[dict[str, Any]], int]:
    """Cut prompts from the left so prompt + longer response fits in ``max_length`` tokens, as Stage 1 does.

    TRL's DPO and SFT trainers keep the start of a sequence that is too long,
    which drops the responses of long dialogues (HH-RLHF) and leaves nothing to
    compare. The prompt keeps at least a quarter of ``max_length``; a response
    longer than the rest is then cut at its end by the trainer.
    ``template_tokens`` reserves room for the chat template's markers.
    Returns the new records and how many prompts were cut. A prompt given as
    several chat messages that must be cut becomes one user message of its text.
    """
    result, cut = [], 0
    for record in records:
        prompt_ids = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        longest = max(len(tokenizer(record[key], add_special_tokens=False)["input_ids"]) for key in ("chosen", "rejected"))
        budget = max(max_length // 4, max_length - longest - template_tokens)
        if len(prompt_ids) <= budget:
            result.append(record)
            continue
        cut += 1
        text = tokenizer.decode(prompt_ids[-budget:], skip_special_tokens=True)
        result.append({**record, "prompt": text, "prompt_messages": None})
    return result, cut


def measure_token_counts(tokenizer: Any, records: Sequence[dict[str, Any]], max_length: int) -> dict[str, list[int]]:
    """Token lengths of prompt + chosen and prompt + rejected per pair, rendered like the trainers' inputs and capped at ``max_length``."""
    conversational = getattr(tokenizer, "chat_template", None) is not None
    lengths: dict[str, list[int]] = {"chosen": [], "rejected": []}
    for record in records:
        for key in ("chosen", "rejected"):
            if conversational:
                messages = [dict(m) for m in record["prompt_messages"]] if record.get("prompt_messages") else [{"role": "user", "content": record["prompt"]}]
                messages.append({"role": "assistant", "content": record[key]})
                ids = tokenizer.apply_chat_template(messages, tokenize=True)
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
            else:
                ids = tokenizer(record["prompt"] + record[key])["input_ids"]
            lengths[key].append(min(len(ids), max_length))
    return lengths


# ---------------------------------------------------------------------------
# Model, LoRA and trainer


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BaselineError("--device cuda was requested but no CUDA device is available; use --device cpu.")
    return device


def use_bf16(precision: str, device: str) -> bool:
    import torch

    if precision == "bf16":
        return True
    return precision == "auto" and device == "cuda" and torch.cuda.is_bf16_supported()


def load_policy(model_path: str) -> tuple[Any, Any]:
    """Load the base model and tokenizer in float32; set a padding token when the tokenizer has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    if getattr(model.config, "quantization_config", None) is not None:
        raise BaselineError(
            f"{model_path} carries a quantization config (a GGUF or bitsandbytes model), which TRL rejects. "
            "Convert it with `python -m coala.backbone convert` and pass the converted folder."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def lora_target_modules(spec: str, model: Any) -> list[str]:
    """Return LoRA target module names: the given comma list, or the standard ones for the model type."""
    if spec != "auto":
        return [name.strip() for name in spec.split(",") if name.strip()]
    if getattr(model.config, "model_type", "") == "gpt2":
        return list(GPT2_TARGETS)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [name for name in LLAMA_TARGETS if name in present]
    if not targets:
        raise BaselineError(f"None of {LLAMA_TARGETS} exist in {type(model).__name__}; pass --lora_target_modules.")
    return targets


def build_lora_config(args: argparse.Namespace, model: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        bias="none",
        target_modules=lora_target_modules(args.lora_target_modules, model),
        task_type="CAUSAL_LM",
    )


def trainer_settings(args: argparse.Namespace, method: str, device: str, has_eval: bool) -> dict[str, Any]:
    """Keyword arguments shared by SFTConfig, DPOConfig and ORPOConfig."""
    settings: dict[str, Any] = {
        "output_dir": str(Path(args.output_dir) / "trainer"),
        "learning_rate": args.learning_rate,
        "adam_beta1": args.adam_beta1,
        "adam_beta2": args.adam_beta2,
        "adam_epsilon": args.adam_epsilon,
        "weight_decay": args.weight_decay,
        "warmup_steps": args.warmup_steps,
        "lr_scheduler_type": args.lr_scheduler_type,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "per_device_eval_batch_size": args.per_device_eval_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "max_grad_norm": args.max_grad_norm,
        "num_train_epochs": args.num_train_epochs,
        "max_steps": args.max_steps,
        "logging_steps": args.logging_steps,
        "logging_first_step": True,
        "save_strategy": "no",
        "report_to": [],
        "seed": args.seed,
        "bf16": use_bf16(args.precision, device),
        "use_cpu": device == "cpu",
        "max_length": args.max_length,
        "disable_tqdm": False,
    }
    if has_eval:
        settings["eval_strategy"] = "steps" if args.eval_steps > 0 else "no"
        if args.eval_steps > 0:
            settings["eval_steps"] = args.eval_steps
    if method in ("dpo", "orpo"):
        settings["beta"] = args.beta
    return settings


def build_trainer(method: str, args: argparse.Namespace, model: Any, tokenizer: Any, train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]], device: str) -> Any:
    """Return the TRL trainer of ``method`` with a LoRA adapter on ``model``."""
    from datasets import Dataset

    train_dataset = Dataset.from_list(train_rows)
    eval_dataset = Dataset.from_list(eval_rows) if eval_rows else None
    settings = trainer_settings(args, method, device, has_eval=eval_dataset is not None)
    lora = build_lora_config(args, model)
    common = {"model": model, "args": None, "train_dataset": train_dataset, "eval_dataset": eval_dataset, "processing_class": tokenizer, "peft_config": lora}

    if method == "sft":
        from trl import SFTConfig, SFTTrainer

        common["args"] = SFTConfig(**settings)
        return SFTTrainer(**common)
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        common["args"] = DPOConfig(**settings)
        return DPOTrainer(**common)
    # ORPO moved to trl.experimental in trl 1.x.
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    common["args"] = ORPOConfig(**settings)
    return ORPOTrainer(**common)


# ---------------------------------------------------------------------------
# Outputs


def split_log_history(log_history: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Split Trainer's log history into per-step train rows, validation rows (``eval_`` prefix dropped) and the final summary."""
    train, summary = [], {}
    validation: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        if "train_runtime" in entry:
            summary = dict(entry)
        elif any(key.startswith("eval_") for key in entry):
            # The end-of-training evaluation repeats the last step's; keep one row per step.
            validation[entry.get("step", -1)] = {key.removeprefix("eval_"): value for key, value in entry.items()}
        else:
            train.append(dict(entry))
    return {"train": train, "validation": list(validation.values()), "summary": [summary] if summary else []}


def analytic_flops(method: str, shape: Any, lengths: dict[str, list[int]], epochs: float, lora_rank: int) -> dict[str, Any]:
    """Analytic FLOPs of this run from the model's shape (``coala.flops.ModelShape``) and the measured training token counts."""
    from coala import flops

    chosen = flops.TokenCounts.from_lengths(lengths["chosen"])
    rejected = flops.TokenCounts.from_lengths(lengths["rejected"])
    adapters = flops.lora_parameter_count(shape, lora_rank)
    if method == "sft":
        total = flops.sft_flops(shape, chosen, epochs, adapters)
    elif method == "dpo":
        total = flops.dpo_flops(shape, chosen, rejected, epochs, adapters)
    else:
        total = flops.orpo_flops(shape, chosen, rejected, epochs, adapters)
    return {"model_shape": shape.to_dict(), "lora_parameters": adapters, "epochs": epochs, "tokens_chosen": chosen.tokens, "tokens_rejected": rejected.tokens, "analytic_flops": total}


def write_run_outputs(
    output_dir: str | Path,
    method: str,
    trainer: Any,
    tokenizer: Any,
    settings: dict[str, Any],
    data_info: dict[str, Any],
    flop_info: dict[str, Any],
    wall_seconds: float,
) -> dict[str, Any]:
    """Save the adapter (PEFT format), tokenizer, metrics.json and run_config.json; return the metrics."""
    output_dir = Path(output_dir)
    trainer.model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    scratch = Path(trainer.args.output_dir)
    if scratch.is_dir() and not any(scratch.iterdir()):
        scratch.rmdir()

    history = split_log_history(trainer.state.log_history)
    metrics = {
        "method": method,
        "steps": trainer.state.global_step,
        "wall_seconds": wall_seconds,
        "train": history["train"],
        "validation": history["validation"],
        "summary": history["summary"][0] if history["summary"] else {},
        "trl_total_flos": float(trainer.state.total_flos),
        "data": data_info,
        **flop_info,
    }
    atomic_write_json(output_dir / METRICS_FILE, metrics)
    atomic_write_json(output_dir / RUN_CONFIG_FILE, settings)
    return metrics


def run_baseline(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train one baseline end to end and write its outputs; return its metrics."""
    import torch
    from transformers import set_seed

    check_args(args)
    set_seed(args.seed)
    device = resolve_device(args.device)

    splits, data_info = load_pair_splits(args.data_path, args.split_seed, args.max_pairs, args.seed, args.split_fractions)
    evaluation = splits["validation"][: args.max_eval_pairs] if args.max_eval_pairs is not None else splits["validation"]
    logger.info("%s on %d train and %d validation pairs from %s", method.upper(), len(splits["train"]), len(evaluation), args.data_path)

    from coala.flops import ModelShape

    model, tokenizer = load_policy(args.model_path)
    shape = ModelShape.from_model(model)  # before TRL adds the LoRA weights
    conversational = getattr(tokenizer, "chat_template", None) is not None
    train_records, cut_train = truncate_prompts(tokenizer, splits["train"], args.max_length)
    evaluation, cut_eval = truncate_prompts(tokenizer, evaluation, args.max_length)
    data_info["prompts_cut_from_left"] = cut_train + cut_eval
    trainer = build_trainer(
        method, args, model, tokenizer,
        to_trl_records(train_records, method, conversational),
        to_trl_records(evaluation, method, conversational),
        device,
    )

    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    if evaluation:
        trainer.evaluate()
    wall = time.perf_counter() - start

    epochs = trainer.state.epoch or args.num_train_epochs
    lengths = measure_token_counts(tokenizer, train_records, args.max_length)
    flop_info = analytic_flops(method, shape, lengths, float(epochs), args.lora_r)
    settings = {**vars(args), "method": method, "device": device, "bf16": use_bf16(args.precision, device), "torch_threads": torch.get_num_threads()}
    flop_info["train_seconds"] = train_seconds
    metrics = write_run_outputs(args.output_dir, method, trainer, tokenizer, settings, data_info, flop_info, wall)
    return metrics


def final_margin(metrics: dict[str, Any]) -> float:
    """The last logged train reward margin, or NaN when the method logs none (SFT)."""
    for row in reversed(metrics.get("train", [])):
        if "rewards/margins" in row:
            return float(row["rewards/margins"])
    return math.nan


def main(method: str, argv: Sequence[str] | None = None) -> int:
    """Run one baseline from the command line: parse flags over the YAML section ``method``, train, print a summary."""
    from coala.config import parse_args_with_config
    from coala.io import setup_logging

    # Settings: defaults < YAML section named after the method < command line
    args = parse_args_with_config(build_parser(method), argv, section=method)
    setup_logging()

    # Data, model, LoRA, training, outputs
    metrics = run_baseline(method, args)

    # Summary
    print(f"{method.upper()}: {metrics['steps']} steps in {metrics['wall_seconds']:.1f} s; "
          f"final train reward margin {final_margin(metrics):.4f}; "
          f"analytic {metrics['analytic_flops'] / 1e12:.4f} TFLOPs; adapter and metrics in {args.output_dir}")
    return 0
