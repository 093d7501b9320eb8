"""Backbone loading: path resolution, local folders, PEFT adapters merged into their base, fingerprints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from coala import backbone
from coala.backbone import (
    BackboneError,
    describe_model,
    load_backbone,
    model_fingerprint,
    resolve_model_source,
)


def test_resolve_model_source_kinds(tiny_model_dir, tmp_path):
    assert resolve_model_source(str(tiny_model_dir)).kind == "folder"
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct") == backbone.ModelSource("hub", "HuggingFaceTB/SmolLM2-135M-Instruct")

    gguf = tmp_path / "model.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    as_file = resolve_model_source(str(gguf))
    assert (as_file.kind, as_file.path, as_file.gguf_file) == ("gguf", str(tmp_path), "model.Q4.gguf")
    as_folder = resolve_model_source(str(tmp_path), "model.Q4.gguf")
    assert (as_folder.kind, as_folder.path, as_folder.gguf_file) == ("gguf", str(tmp_path), "model.Q4.gguf")


def test_resolve_model_source_errors(tmp_path):
    with pytest.raises(BackboneError, match="Model path not found"):
        resolve_model_source(str(tmp_path / "missing"))
    with pytest.raises(BackboneError, match="Model path not found"):
        resolve_model_source("missing/model.gguf")
    text_file = tmp_path / "weights.txt"
    text_file.write_text("x")
    with pytest.raises(BackboneError, match="not a .gguf file"):
        resolve_model_source(str(text_file))
    with pytest.raises(BackboneError, match="no config.json"):
        resolve_model_source(str(tmp_path))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(BackboneError, match="base_model_name_or_path"):
        resolve_model_source(str(adapter))


def test_smollm2_gguf_path_resolves():
    gguf = backbone.find_smollm2_gguf()
    source = resolve_model_source(str(gguf))
    assert source.kind == "gguf"
    assert source.gguf_file == gguf.name


def test_load_backbone_local_folder_frozen(tiny_model_dir):
    model, tokenizer = load_backbone(str(tiny_model_dir), dtype="float32", device="cpu")
    assert not model.training
    assert all(not parameter.requires_grad for parameter in model.parameters())
    assert tokenizer.chat_template
    shape = describe_model(model)
    assert shape == {"hidden_size": 32, "num_layers": 2, "num_parameters": sum(p.numel() for p in model.parameters())}


def test_load_backbone_dtype(tiny_model_dir):
    model, _ = load_backbone(str(tiny_model_dir), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(BackboneError, match="Unknown dtype"):
        load_backbone(str(tiny_model_dir), dtype="float8")


def test_resolve_dtype_auto_on_cpu():
    assert backbone.resolve_dtype("auto", "cpu") == "float32"
    assert backbone.resolve_dtype("float16", "cpu") == "float16"


def test_peft_adapter_merged_into_base(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, config).eval()
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(tiny_model_dir)
    (adapter_dir / "adapter_config.json").write_text(json.dumps(adapter_config))

    input_ids = torch.tensor([[5, 17, 42, 9, 100]])
    with torch.inference_mode():
        expected = peft_model(input_ids=input_ids).logits
        merged, tokenizer = load_backbone(str(adapter_dir))
        plain, _ = load_backbone(str(tiny_model_dir))
        got = merged(input_ids=input_ids).logits
        unadapted = plain(input_ids=input_ids).logits
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert tokenizer.chat_template
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, unadapted, atol=1e-3)


def test_model_fingerprint_tracks_files(tiny_model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    first = model_fingerprint(str(copy))
    assert first == model_fingerprint(str(copy))
    (copy / ".cache-note").write_text("hidden files are ignored")
    assert model_fingerprint(str(copy)) == first
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    (copy / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(str(copy)) != first


def test_convert_command_reports_missing_file(tmp_path, capsys):
    code = backbone.main(["convert", str(tmp_path / "absent.gguf"), str(tmp_path / "out")])
    assert code == 2
    assert "GGUF file not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
