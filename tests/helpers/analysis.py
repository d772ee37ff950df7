"""Tiny inputs of the analyses (coefficient, distance, robustness, unseen-task and PEM tables)
and a check that a figure was written, shared by the analysis and report tests."""
from pathlib import Path

import pandas as pd
import torch

from pipeline.analysis import pem, robustness, unseen
from pipeline.functional import FlatLayout
from pipeline.merging.adamerging import Result, Settings, entropy_table, lambda_table
from pipeline.models.checkpoints import save_state_dict

TASKS = ["colour", "stripes", "size"]


def _png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


def _layout() -> FlatLayout:
    sd = {"conv1.weight": torch.zeros(4, 3), "transformer.resblocks.0.attn.in_proj_weight": torch.zeros(6),
          "transformer.resblocks.0.mlp.c_fc.weight": torch.zeros(5),
          "transformer.resblocks.1.mlp.c_fc.weight": torch.zeros(5), "ln_post.weight": torch.zeros(2),
          "proj": torch.zeros(2, 2)}
    return FlatLayout.of(sd)


def _lambdas(variant: str, layer_wise: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    layout = _layout()
    segments = len(layout.names) if layer_wise else 1
    raw = {0: torch.full((len(TASKS), segments), 0.3), 5: torch.rand(len(TASKS), segments, generator=torch.Generator().manual_seed(0))}
    result = Result(variant, layout, Settings(), raw, [3.0, 2.5, 2.0, 1.8, 1.7], {})
    return lambda_table(result, TASKS), entropy_table(result)


def _coefficient_inputs():
    parts = [_lambdas(v, lw) for v, lw in [("task_wise", False), ("layer_wise", True), ("task_wise_plus", False),
                                          ("layer_wise_plus", True)]]
    return pd.concat([p[0] for p in parts], ignore_index=True), pd.concat([p[1] for p in parts], ignore_index=True)


def _models(tmp_path: Path) -> dict[str, Path]:
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(4, 3, generator=g), "b.bias": torch.randn(5, generator=g),
            "steps": torch.tensor(3)}
    files = {}
    save_state_dict({f"visual.{k}": v for k, v in base.items()} | {"text.w": torch.ones(2)}, tmp_path / "pre.safetensors")
    files["pretrained"] = tmp_path / "pre.safetensors"
    for i in range(2):
        sd = {k: v + (i + 1) * 0.1 if v.is_floating_point() else v for k, v in base.items()}
        save_state_dict(sd, tmp_path / f"m{i}.safetensors")
        files[f"finetuned_t{i}"] = tmp_path / f"m{i}.safetensors"
    return files


def _robustness_rows() -> pd.DataFrame:
    rows = []
    for c in ["clean", "gaussian_noise", "contrast"]:
        for m in robustness.METHODS:
            for t in TASKS:
                for s in (["clean"] if c == "clean" else ["clean", "corrupted"]):
                    rows.append({"corruption": c, "severity": 0 if c == "clean" else 3, "method": m, "task": t,
                                 "test_set": s, "accuracy": 50.0 + len(m), "n": 10})
    return pd.DataFrame(rows, columns=robustness.COLUMNS)


def _unseen_rows() -> pd.DataFrame:
    rows = [{"method": m, "task": t, "group": "unseen" if t == "size" else "seen", "accuracy": 40.0 + i, "n": 9}
            for i, m in enumerate(["task_arithmetic", "adamerging_layer_wise", "ties_merging"]) for t in TASKS]
    return pd.DataFrame(rows, columns=unseen.COLUMNS)


def _pem_rows() -> pd.DataFrame:
    rows = [{"update": u, "method": m, "task": t, "role": r, "accuracy": acc, "lam": 0.3}
            for u, base in (("full", 80.0), ("lora", 70.0)) for t in TASKS
            for m, r, acc in (("individual", "target", base + 15), ("addition", "all", base),
                              ("negation", "target", 20.0), ("negation", "control", 60.0), ("adamerging", "all", base + 5))]
    return pd.DataFrame(rows, columns=pem.COLUMNS)
