"""The adapt verb (Surgery, WEMoE) and the evaluation of its routed merges through the CLI."""
import json

import pandas as pd
import pytest
from helpers.adamerging import perturbed_zoo, verb_inputs

from pipeline.cli import main
from pipeline.models.checkpoints import save_state_dict


@pytest.fixture(scope="module")
def zoo():
    return perturbed_zoo()


@pytest.mark.parametrize("method", ["surgery", "wemoe"])
def test_adapt_writes_the_merge_and_evaluate_routes_it(zoo, tmp_path, method):
    _, pre, finetuned, heads, _ = zoo
    common = verb_inputs(tmp_path, finetuned, heads)
    out = tmp_path / method
    extra = []
    if method == "surgery":
        base = tmp_path / "merges" / "base.safetensors"
        save_state_dict({k: v + 0.3 * sum(ft[k] - v for ft in finetuned[:2]) for k, v in pre.items()}, base)
        extra = ["--base", str(base)]
    else:
        extra = ["--routing", str(out / "routing.parquet"), "--routing-figure", str(out / "routing.png")]
    model = out / ("model.json" if method == "surgery" else "model.safetensors")
    settings = {"steps": 4, "batch_size": 5} | ({"base": "task_arithmetic"} if method == "surgery" else {})
    main(["adapt", *common, "--method", method, *extra, "--settings", json.dumps(settings), "--max-images", "10",
          "--out", str(model), "--summary", str(out / "summary.json"), "--curve", str(out / "curve.parquet"),
          "--threads", "1"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["added_parameters"] > 0
    assert len(pd.read_parquet(out / "curve.parquet")) == (4 * 2 if method == "surgery" else 4)
    if method == "wemoe":
        assert summary["blocks"] == [0, 1, 2, 3] and (out / "routing.png").stat().st_size > 0
        assert set(pd.read_parquet(out / "routing.parquet")["task"]) == {"a", "b"}
    else:
        assert sorted(p.name for p in (out / "modules").iterdir()) == ["a.safetensors", "b.safetensors"]
    opts = dict(zip(common[::2], common[1::2]))  # --zoo, --pretrained, ...: one value each but the lists
    main(["evaluate", "--zoo", opts["--zoo"], "--pretrained", opts["--pretrained"], "--model", method,
          "--method", method, "--encoder", str(model), "--tasks", "a", "b",
          "--heads", str(tmp_path / "head0.safetensors"), str(tmp_path / "head1.safetensors"),
          "--data", str(tmp_path / "t0.npz"), str(tmp_path / "t1.npz"), "--device", "cpu",
          "--out", str(out / "eval.parquet"), "--threads", "1"])
    evals = pd.read_parquet(out / "eval.parquet")
    assert list(evals["task"]) == ["a", "b"] and (evals["method"] == method).all()


def test_adapt_refuses_surgery_without_base_and_other_methods(zoo, tmp_path):
    _, _, finetuned, heads, _ = zoo
    common = verb_inputs(tmp_path, finetuned, heads)
    outs = ["--out", str(tmp_path / "m"), "--summary", str(tmp_path / "s"), "--curve", str(tmp_path / "c")]
    with pytest.raises(ValueError, match="surgery needs --base"):
        main(["adapt", *common, "--method", "surgery", *outs])
    with pytest.raises(ValueError, match=r"adapt runs \['wemoe', 'surgery'\], not 'adamerging_task_wise'"):
        main(["adapt", *common, "--method", "adamerging_task_wise", *outs])
