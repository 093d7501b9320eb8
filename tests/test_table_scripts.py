"""Every reproduction script runs at SCALE=ci and writes its markdown table and CSV."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# Ordered so later scripts reuse the runs of earlier ones through the shared work folder.
SCRIPTS = [
    ("table3_tflops.sh", "table3"),
    ("figure1_reward_margins.sh", "figure1"),
    ("table7_cronos_vs_adamw.sh", "table7"),
    ("table1_alpacaeval.sh", "table1"),
    ("table2_human_eval.sh", "table2"),
]


@pytest.fixture(scope="module")
def ci_roots(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tables")
    return root / "results", root / "work"


@pytest.mark.parametrize("script,table", SCRIPTS)
def test_script_runs_at_ci_scale(script, table, ci_roots):
    results_root, work_dir = ci_roots
    env = {**os.environ, "SCALE": "ci", "RESULTS_ROOT": str(results_root), "WORK_DIR": str(work_dir), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(["bash", str(REPO_ROOT / "scripts" / script)], env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]

    markdown = (results_root / table / "table.md").read_text()
    assert markdown.startswith("# ")
    assert "Scale ci" in markdown
    assert "|---|" in markdown
    with open(results_root / table / "table.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows, f"{table}/table.csv has no rows"
    if table == "figure1":
        assert (results_root / table / "reward_margins.png").stat().st_size > 1000
        assert {row["method"] for row in rows} == {"COALA", "DPO"}
    if table == "table1":
        assert {row["method"] for row in rows} == {"COALA", "DPO", "ORPO", "SFT"}
    if table == "table2":
        assert "STAND-IN, NOT HUMAN DATA" in markdown
    if table == "table3":
        llama = [row for row in rows if row["model"] == "Llama-3.1-8B" and row["method"] == "COALA"]
        assert llama and 0 < float(llama[0]["ours COALA / DPO"]) < 1
        assert abs(float(llama[0]["paper COALA / DPO"]) - 0.176) < 0.001


def test_missing_offline_data_stops_before_work(tmp_path):
    env = {**os.environ, "SCALE": "small", "RESULTS_ROOT": str(tmp_path / "results"), "COALA_OFFLINE_DATA": str(tmp_path / "empty")}
    completed = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "table1_alpacaeval.sh")], env=env,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode != 0
    assert "COALA_OFFLINE_DATA" in completed.stderr
    assert "gpt4_1106_preview_model_outputs.json.gz" in completed.stderr
    assert not (tmp_path / "results").exists()


def load_reproduce():
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("reproduce", REPO_ROOT / "scripts" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module
    spec.loader.exec_module(module)
    return module


def make_finished_run(folder: Path, settings: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(settings))
    marker = folder / "metrics.json"
    marker.write_text("{}")
    return marker


def test_reusable_run_cache(tmp_path):
    reproduce = load_reproduce()
    saved = {"rho": 0.3, "features_dir": "results/x", "model_name": "SmolLM2", "output_dir": "a"}
    run = tmp_path / "run"
    marker = make_finished_run(run, saved)

    same = {"rho": 0.3, "features_dir": str(Path("results/x").resolve()), "model_name": None, "output_dir": "b"}
    assert reproduce.reusable(run, marker, run / "config.json", same)
    assert run.exists()

    upstream = tmp_path / "upstream.json"
    upstream.write_text("{}")
    os.utime(marker, (1, 1))
    assert not reproduce.reusable(run, marker, run / "config.json", same, inputs=(upstream,))
    assert not run.exists()

    marker = make_finished_run(run, saved)
    assert not reproduce.reusable(run, marker, run / "config.json", {**same, "rho": 1.0})
    assert not run.exists()

    assert not reproduce.reusable(run, marker, run / "config.json", same)


def test_table2_from_votes_needs_no_runs(tmp_path):
    votes = tmp_path / "votes.csv"
    votes.write_text("participant,dataset,question,preferred_method\np1,Edu,q1,COALA\np2,Edu,q2,DPO\n")
    env = {**os.environ, "SCALE": "small", "RESULTS_ROOT": str(tmp_path / "results"), "VOTES": str(votes),
           "COALA_OFFLINE_DATA": str(tmp_path / "empty")}
    completed = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "table2_human_eval.sh")], env=env,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    markdown = (tmp_path / "results" / "table2" / "table.md").read_text()
    assert "human votes supplied by the user" in markdown
    assert not (tmp_path / "results" / "work" / "runs" / "small" / "models").exists()
