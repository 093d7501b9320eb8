"""Shared file formats and config handling: YAML merging, head folders, feature folders, atomic writes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from coala.config import ConfigError, add_config_flag, parse_args_with_config
from coala.features import (
    FeatureError,
    dataset_name_from_path,
    feature_dir_name,
    find_feature_dirs,
    load_features,
    model_name_from_path,
)
from coala.head import HeadError, HeadParams, load_head, save_head
from coala.io import atomic_write_text


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_config_flag(parser)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=10)
    return parser


def test_config_yaml_then_cli_precedence(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("beta: 2.5\nepochs: 3\n")
    args = parse_args_with_config(make_parser(), ["--config", str(config), "--epochs", "7"])
    assert args.beta == 2.5
    assert args.epochs == 7


def test_config_sections_pick_own(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("model_shape: {num_layers: 2}\nfinetune: {beta: 0.5}\ncronos: {rho: 0.1}\n")
    args = parse_args_with_config(make_parser(), ["--config", str(config)], section="finetune")
    assert args.beta == 0.5
    assert args.epochs == 10


def test_config_unknown_key_rejected(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("betta: 2.5\n")
    with pytest.raises(ConfigError, match="betta"):
        parse_args_with_config(make_parser(), ["--config", str(config)])


@pytest.mark.parametrize("text, key", [("epochs: 5.0\n", "epochs"), ("epochs: 1.5\n", "epochs"),
                                       ("beta: null\n", "beta"), ("beta: [1, 2]\n", "beta"),
                                       ("beta: true\n", "beta"), ("epochs: {a: 1}\n", "epochs")])
def test_config_value_of_wrong_type_rejected(tmp_path: Path, text: str, key: str) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=key):
        parse_args_with_config(make_parser(), ["--config", str(config)])


def test_config_values_get_flag_types(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("beta: 3\nepochs: '4'\n")
    args = parse_args_with_config(make_parser(), ["--config", str(config)])
    assert args.beta == 3.0
    assert isinstance(args.beta, float)
    assert args.epochs == 4
    assert isinstance(args.epochs, int)


def test_config_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        parse_args_with_config(make_parser(), ["--config", str(tmp_path / "absent.yaml")])
    broken = tmp_path / "broken.yaml"
    broken.write_text("beta: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_args_with_config(make_parser(), ["--config", str(broken)])


def random_head(d: int = 6, m: int = 4, seed: int = 0) -> HeadParams:
    rng = np.random.default_rng(seed)
    return HeadParams(
        theta1=rng.normal(size=(d, m)).astype(np.float32),
        theta2=rng.normal(size=m).astype(np.float32),
        feature_mean=rng.normal(size=d).astype(np.float32),
        feature_std=rng.uniform(0.5, 2.0, size=d).astype(np.float32),
        config={"stage": "cronos", "pooling": {"pool": "mean"}},
    )


def test_head_roundtrip_and_score(tmp_path: Path) -> None:
    params = random_head()
    save_head(tmp_path / "head", params, metrics={"accuracy": 0.5})
    loaded = load_head(tmp_path / "head")
    features = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)
    expected = np.maximum(((features - params.feature_mean) / params.feature_std) @ params.theta1, 0) @ params.theta2
    np.testing.assert_allclose(loaded.score(features), expected, rtol=1e-5, atol=1e-6)
    assert loaded.config["stage"] == "cronos"
    assert json.loads((tmp_path / "head" / "metrics.json").read_text())["accuracy"] == 0.5


def test_head_missing_corrupt_and_bad_shapes(tmp_path: Path) -> None:
    with pytest.raises(HeadError, match="not found"):
        load_head(tmp_path / "absent")
    save_head(tmp_path / "head", random_head())
    (tmp_path / "head" / "head.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(HeadError, match="corrupt"):
        load_head(tmp_path / "head")
    bad = random_head()
    bad.theta2 = bad.theta2[:-1]
    with pytest.raises(HeadError, match="theta2"):
        save_head(tmp_path / "bad", bad)
    with pytest.raises(HeadError, match=r"expects \(n, 6\)"):
        random_head().score(np.zeros((2, 5), dtype=np.float32))


def write_feature_folder(folder: Path, n: int = 8, d: int = 4, paired: bool = True) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    np.save(folder / "chosen.npy", rng.normal(size=(n, d)).astype(np.float32))
    np.save(folder / "rejected.npy", rng.normal(size=(n, d)).astype(np.float32))
    splits = ["train"] * (n - 2) + ["validation", "test"]
    rows = [{"pair_id": f"p{i}", "split": split} for i, split in enumerate(splits)]
    (folder / "meta.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "manifest.json").write_text(json.dumps({"pool": "mean", "paired": paired}))
    return folder


def test_features_load_and_split(tmp_path: Path) -> None:
    features = load_features(write_feature_folder(tmp_path / "m__d__mean"))
    chosen, rejected = features.split("train")
    assert chosen.shape == (6, 4)
    assert rejected.shape == (6, 4)
    assert features.attn_scorer() is None


def test_features_errors_name_problem(tmp_path: Path) -> None:
    with pytest.raises(FeatureError, match="not found"):
        load_features(tmp_path / "absent")
    folder = write_feature_folder(tmp_path / "unfinished")
    (folder / "manifest.json").unlink()
    with pytest.raises(FeatureError, match="did not finish"):
        load_features(folder)
    folder = write_feature_folder(tmp_path / "nan")
    array = np.load(folder / "chosen.npy")
    array[2, 1] = np.nan
    np.save(folder / "chosen.npy", array)
    with pytest.raises(FeatureError, match="NaN"):
        load_features(folder)
    folder = write_feature_folder(tmp_path / "mismatch")
    np.save(folder / "rejected.npy", np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(FeatureError, match="as many chosen rows"):
        load_features(folder)


def test_feature_naming_and_lookup(tmp_path: Path) -> None:
    assert model_name_from_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"
    assert model_name_from_path("/x/models/", gguf_file="SmolLM2.Q4_1.gguf") == "SmolLM2.Q4_1"
    assert dataset_name_from_path("../data/harmless-base-test.jsonl.gz") == "harmless-base-test"
    assert dataset_name_from_path("datasets/edu_sample/") == "edu_sample"
    name = feature_dir_name("SmolLM2-135M", "edu_sample", "attn", "response")
    assert name == "SmolLM2-135M__edu_sample__attn-response"
    write_feature_folder(tmp_path / "SmolLM2-135M__edu__mean")
    write_feature_folder(tmp_path / "SmolLM2-135M-Instruct__edu__mean")
    found = find_feature_dirs(tmp_path, "SmolLM2-135M")
    assert [path.name for path in found] == ["SmolLM2-135M__edu__mean"]


def test_atomic_write_keeps_old_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")

    class Boom(Exception):
        pass

    def failing_write(tmp: Path) -> None:
        tmp.write_text("partial")
        raise Boom

    from coala.io import atomic_write

    with pytest.raises(Boom):
        atomic_write(target, failing_write)
    assert target.read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["out.txt"]


def test_cli_user_error_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from coala.cli import run_cli

    def fail_with_config_error() -> None:
        raise ConfigError("Config file x.yaml has unknown keys ['betta'].")

    with pytest.raises(SystemExit) as exit_info:
        run_cli(fail_with_config_error)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: Config file x.yaml has unknown keys ['betta']."


def test_cli_bug_keeps_traceback() -> None:
    from coala.cli import run_cli

    def fail_with_bug() -> None:
        raise ValueError("not a coala error")

    with pytest.raises(ValueError, match="not a coala error"):
        run_cli(fail_with_bug)


def test_cli_interrupt_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    from coala.cli import run_cli

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_cli(interrupted, interrupted_hint="Rerun to resume.")
    assert exit_info.value.code == 130
    assert "Rerun to resume." in capsys.readouterr().err
