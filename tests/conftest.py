"""Shared fixtures: a tiny Llama model built from a config, and the offline SmolLM2 backbone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from coala.data import offline_data_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = offline_data_dir()
HH_RLHF_FILE = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
ALPACA_DIR = SHARED_DATA / "alpaca_eval"

# A model download would hang CI; every test runs offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_CORPUS = [
    "The student asked how photosynthesis turns light into chemical energy.",
    "The tutor explained that chlorophyll absorbs light and plants store sugar.",
    "Human: How do I bake bread? Assistant: Mix flour, water, salt and yeast.",
    "A good answer is clear, correct and kind. A bad answer is vague or rude.",
    "Numbers like 1 2 3 4 5 6 7 8 9 0 and symbols ! ? , . : ; ' \" ( ) - appear too.",
]


def build_tiny_model(output_dir: Path, chat_template: bool = True, pad_equals_eos: bool = False) -> Path:
    """Save a randomly initialized 2-layer Llama and a byte-level BPE tokenizer trained on a few sentences."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer_model = Tokenizer(models.BPE(unk_token=None))
    tokenizer_model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer_model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer_model.train_from_iterator(TINY_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_model,
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        pad_token="<|im_end|>" if pad_equals_eos else "<|pad|>",
    )
    if chat_template:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama folder with a chat template and a distinct padding token."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model_pad_eos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama folder without a chat template whose padding token equals EOS."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama-pad-eos"), chat_template=False, pad_equals_eos=True)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the offline GGUF once and cached across runs."""
    from coala.backbone import BackboneError, ensure_converted_smollm2

    cache = Path(os.environ.get("COALA_TEST_CACHE", Path.home() / ".cache" / "coala-tests"))
    try:
        return ensure_converted_smollm2(cache)
    except BackboneError as error:
        pytest.fail(f"Offline backbone unavailable: {error}")


@pytest.fixture(scope="session")
def hh_rlhf_file() -> Path:
    if not HH_RLHF_FILE.is_file():
        pytest.fail(f"Shared HH-RLHF file not found at {HH_RLHF_FILE}")
    return HH_RLHF_FILE
