"""Published numbers of Feng & Pilanci, "Convex Optimization for Alignment and Preference Learning on a Single GPU" (ICML 2026).

The reproduction scripts (scripts/reproduce.py) print these next to our
measurements for the same cells. Keys use the paper's labels: models
"Mistral-7B", "Dolphin-7B", "Llama-3.1-8B", "DistilGPT2", "GPT-2"; data sets
"Edu" (EduFeedback), "IMDb", "Ultra" (UltraFeedback-binarized).
"""

from __future__ import annotations

# Table 1: AlpacaEval 2, mean and std over 3 runs, GPT-4-turbo judge.
# (model, method, dataset) -> {"LC WR": (mean, std), "WR": (mean, std), "len": (mean, std)}
_TABLE1_ROWS = {
    ("Mistral-7B", "COALA"): [(24.61, 0.30), (24.88, 1.46), (20.84, 1.35), (23.82, 1.38), (23.11, 1.96), (20.91, 1.65), (592, 37), (418, 30), (459, 35)],
    ("Mistral-7B", "ORPO"): [(17.01, 2.82), (17.58, 2.32), (16.04, 2.30), (14.67, 2.87), (15.62, 2.48), (12.28, 2.34), (561, 30), (368, 39), (350, 31)],
    ("Mistral-7B", "DPO"): [(24.19, 1.19), (24.30, 1.26), (17.68, 1.67), (22.45, 1.50), (22.74, 1.26), (15.56, 2.11), (492, 37), (502, 55), (453, 34)],
    ("Mistral-7B", "SFT"): [(6.80, 0.51), (8.42, 1.16), (6.18, 1.31), (10.30, 1.03), (1.77, 1.73), (6.11, 1.59), (515, 20), (428, 31), (463, 34)],
    ("Dolphin-7B", "COALA"): [(40.81, 0.22), (39.72, 0.36), (31.58, 0.34), (39.05, 0.29), (38.46, 0.41), (30.21, 0.38), (439, 38), (454, 33), (445, 37)],
    ("Dolphin-7B", "ORPO"): [(25.06, 1.93), (24.90, 1.23), (22.94, 1.26), (23.59, 1.18), (22.92, 1.77), (25.93, 2.51), (526, 9), (448, 37), (452, 45)],
    ("Dolphin-7B", "DPO"): [(34.73, 0.80), (33.86, 0.72), (26.41, 0.68), (32.46, 1.09), (31.58, 1.52), (24.86, 1.02), (494, 34), (511, 49), (476, 35)],
    ("Dolphin-7B", "SFT"): [(17.36, 0.38), (16.21, 0.23), (14.88, 0.46), (15.30, 0.10), (15.47, 0.44), (12.76, 1.08), (404, 39), (423, 25), (459, 24)],
    ("Llama-3.1-8B", "COALA"): [(40.90, 0.09), (27.64, 0.27), (20.64, 0.08), (38.20, 0.11), (25.68, 0.36), (18.32, 0.23), (562, 12), (415, 33), (552, 20)],
    ("Llama-3.1-8B", "ORPO"): [(23.87, 0.60), (12.10, 0.71), (12.91, 0.50), (20.58, 0.68), (12.05, 0.55), (10.95, 0.55), (599, 70), (610, 33), (354, 41)],
    ("Llama-3.1-8B", "DPO"): [(40.68, 0.10), (21.79, 0.29), (18.89, 0.31), (38.53, 0.47), (20.18, 0.49), (15.81, 0.30), (539, 24), (449, 98), (503, 39)],
    ("Llama-3.1-8B", "SFT"): [(10.92, 0.20), (8.16, 0.11), (7.41, 0.30), (10.75, 0.39), (8.11, 0.66), (5.62, 0.78), (384, 55), (435, 49), (546, 15)],
}
PAPER_TABLE1: dict[tuple[str, str, str], dict[str, tuple[float, float]]] = {
    (model, method, dataset): {"LC WR": cells[i], "WR": cells[3 + i], "len": cells[6 + i]}
    for (model, method), cells in _TABLE1_ROWS.items()
    for i, dataset in enumerate(("Edu", "IMDb", "Ultra"))
}

# Table 2: human study, 107 participants; (dataset, method) -> (win rate %, 95% Wald half-width %).
PAPER_TABLE2: dict[tuple[str, str], tuple[float, float]] = {
    ("Edu", "COALA"): (39.1, 9.2), ("Edu", "ORPO"): (15.5, 6.8), ("Edu", "DPO"): (28.8, 8.6), ("Edu", "SFT"): (16.6, 7.1),
    ("IMDb", "COALA"): (42.7, 9.4), ("IMDb", "ORPO"): (20.1, 7.6), ("IMDb", "DPO"): (24.8, 8.2), ("IMDb", "SFT"): (12.4, 6.2),
}

# Table 3: TFLOPs per method on EduFeedback (the release's wall time x 231 TFLOP/s estimate).
PAPER_TABLE3: dict[str, dict[str, float]] = {
    "DistilGPT2": {"COALA": 152.56, "DPO": 537.12, "ORPO": 643.33, "SFT": 271.0},
    "GPT-2": {"COALA": 379.89, "DPO": 1087.45, "ORPO": 1305.27, "SFT": 522.0},
    "Mistral-7B": {"COALA": 1580.45, "DPO": 9284.71, "ORPO": 11241.89, "SFT": 2492.0},
    "Llama-3.1-8B": {"COALA": 1805.39, "DPO": 10253.37, "ORPO": 12352.98, "SFT": 2851.0},
    "Dolphin-7B": {"COALA": 1794.66, "DPO": 10091.25, "ORPO": 12116.50, "SFT": 2804.0},
}
# EduFeedback's train split (90% of 65,606 pairs).
PAPER_TABLE3_TRAIN_PAIRS = 59045

# Table 7: Stage 1 test accuracy %, (model, dataset) -> (CRONOS, AdamW), SFT-trained backbones.
_TABLE7_ROWS = {
    "DistilGPT2": [(53.50, 53.80), (60.60, 56.18), (83.05, 82.62)],
    "GPT-2": [(53.83, 52.93), (61.15, 59.80), (78.84, 78.78)],
    "Mistral-7B": [(57.63, 52.95), (69.83, 62.02), (91.76, 83.52)],
    "Dolphin-7B": [(62.27, 56.33), (72.29, 69.43), (93.72, 83.40)],
    "Llama-3.1-8B": [(57.68, 51.20), (71.01, 68.55), (90.43, 86.60)],
}
PAPER_TABLE7: dict[tuple[str, str], tuple[float, float]] = {
    (model, dataset): cells[i] for model, cells in _TABLE7_ROWS.items() for i, dataset in enumerate(("Ultra", "Edu", "IMDb"))
}
