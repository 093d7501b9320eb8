"""FLOP formulas against hand-computed values and against transformers' own count."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from coala.flops import (
    ModelShape,
    TokenCounts,
    coala_flops,
    cronos_matvec_count,
    dpo_flops,
    forward_flops,
    full_finetune_flops,
    lora_parameter_count,
    lora_train_flops,
    non_embedding_parameter_count,
    orpo_flops,
    sft_flops,
)

HAND_SHAPE = ModelShape(num_layers=2, hidden_size=4, num_parameters=100, embedding_parameters=40, vocab_size=10)


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32))


def test_token_counts_from_lengths():
    counts = TokenCounts.from_lengths([3, 5])
    assert counts.sequences == 2
    assert counts.tokens == 8
    assert counts.squared_tokens == 34


def test_forward_flops_hand_value():
    counts = TokenCounts.from_lengths([3, 5])
    # 2*100*8 (weights) + 2*2*4*34 (attention scores) + 2*10*4*8 (logits)
    assert forward_flops(HAND_SHAPE, counts) == 1600 + 544 + 640
    assert forward_flops(HAND_SHAPE, counts, with_logits=False) == 1600 + 544


def test_method_totals_hand_values():
    chosen = TokenCounts.from_lengths([3, 5])
    rejected = TokenCounts.from_lengths([4])
    both = chosen + rejected
    forward_both = 2 * 100 * 12 + 2 * 2 * 4 * 50 + 2 * 10 * 4 * 12
    assert forward_flops(HAND_SHAPE, both) == forward_both
    assert orpo_flops(HAND_SHAPE, chosen, rejected) == 3 * forward_both
    assert dpo_flops(HAND_SHAPE, chosen, rejected, epochs=2) == 2 * (3 * forward_both + forward_both)
    assert sft_flops(HAND_SHAPE, chosen) == 3 * 2784
    assert lora_train_flops(HAND_SHAPE, chosen, lora_parameters=7) == 2 * 2784 + 6 * 7 * 8
    assert dpo_flops(HAND_SHAPE, chosen, rejected, lora_parameters=7) == 2 * forward_both + 6 * 7 * 12 + forward_both


def test_cronos_matvec_count_hand_value():
    # P=2: system apply 12 products; Nystrom rank 3 -> 36; 2 ADMM iterations of 4 PCG steps: 2*(48 + 10)
    assert cronos_matvec_count(num_patterns=2, admm_iters=2, pcg_iters=4, nystrom_rank=3) == 36 + 116


def test_coala_stages_hand_values():
    chosen = TokenCounts.from_lengths([3, 5])
    rejected = TokenCounts.from_lengths([4, 2])
    stages = coala_flops(HAND_SHAPE, chosen, rejected, num_patterns=2, finetune_epochs=3, matvecs=10)
    assert stages["stage1"] == 2 * 100 * 14 + 2 * 2 * 4 * (9 + 25 + 16 + 4)
    assert stages["cronos"] == 2 * 4 * 4 * 10
    assert stages["finetune"] == 2 * 4 * 4 * 4 + 3 * 6 * 4 * 4
    assert stages["total"] == stages["stage1"] + stages["cronos"] + stages["finetune"]


def test_llama_shape_matches_model(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    shape = ModelShape.from_model(model)
    assert shape.num_parameters == model.num_parameters(exclude_embeddings=True)
    assert non_embedding_parameter_count(shape) == shape.num_parameters
    assert shape.num_parameters + shape.embedding_parameters == sum(p.numel() for p in model.parameters())


def test_gpt2_shape_matches_model():
    model = tiny_gpt2()
    shape = ModelShape.from_model(model)
    assert shape.architecture == "gpt2"
    assert non_embedding_parameter_count(shape) == shape.num_parameters


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_lora_count_matches_peft(kind, tiny_model_dir):
    if kind == "llama":
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    else:
        model = tiny_gpt2()
        targets = ["c_attn", "c_proj"]
    shape = ModelShape.from_model(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_parameter_count(shape, rank=4) == trainable


def test_full_finetune_matches_trainer_count(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    shape = ModelShape.from_model(model)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))
    input_ids = torch.ones((3, 7), dtype=torch.long)
    ours = full_finetune_flops(shape, TokenCounts.uniform(3, 7), with_attention=False, with_logits=False)
    assert ours == trainer.floating_point_ops({"input_ids": input_ids})


def test_shape_from_mapping_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown keys"):
        ModelShape.from_mapping({"num_layers": 1, "hidden_size": 2, "num_parameters": 3, "embedding_parameters": 1, "vocab_size": 4, "layers": 2})
    with pytest.raises(ValueError, match="missing"):
        ModelShape.from_mapping({"num_layers": 1})
    with pytest.raises(ValueError, match="num_layers must be positive"):
        ModelShape(num_layers=0, hidden_size=2, num_parameters=3, embedding_parameters=1, vocab_size=4)
    with pytest.raises(ValueError, match="non-negative"):
        TokenCounts.from_lengths([3, -1])
