#!/usr/bin/env python
"""Train the ORPO baseline: a LoRA adapter by odds-ratio preference optimization on the preference pairs, no reference model.

    python baselines/train_orpo.py --model_path MODEL_DIR --data_path DATA --output_dir OUT [--config configs/X.yaml]

Reads the same pairs and train/validation split as Stage 1, logs TRL's
per-step metrics to OUT/metrics.json and saves the adapter in PEFT format
(loadable by extract.py and eval_alpaca.py). A sectioned config is read from
its `orpo` section.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coala import baselines  # noqa: E402

METHOD = "orpo"


def build_parser() -> argparse.ArgumentParser:
    return baselines.build_parser(METHOD)


def main(argv: Sequence[str] | None = None) -> int:
    return baselines.main(METHOD, argv)


if __name__ == "__main__":
    from coala.cli import run_cli

    run_cli(main)
