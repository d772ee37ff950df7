"""TIES-Merging against a plain dense torch implementation (tests/helpers/merging.py)."""
import math

import pytest
import torch
from helpers.merging import TASKS, assert_state_close, dense_ties, dense_tvs, make_store, merged, unflatten, vector
from helpers.store import encoder_state

from pipeline.merging import registry
from pipeline.merging.contract import Inputs
from pipeline.store.task_vectors import TaskVectorStore


@pytest.mark.parametrize("merge", ["mean", "sum"])
@pytest.mark.parametrize("k", [10, 20, 100])
def test_ties_matches_dense(zoo, k, merge):
    pre, fts, store = zoo
    expected = unflatten(pre, dense_ties(dense_tvs(pre, fts), k, merge), 0.3)
    assert_state_close(merged("ties_merging", pre, store, k=k, merge=merge, lam=0.3), expected)


@pytest.mark.parametrize("merge", ["mean", "sum"])
@pytest.mark.parametrize("k", [0, 10, 20, 50, 100])
def test_ties_keeps_exactly_with_ties_and_zero_signs(tmp_path, k, merge):
    """Few magnitude levels: many entries tie at the threshold, and +x/-x pairs elect sign 0."""
    pre = encoder_state()
    g = torch.Generator().manual_seed(k)
    fts, prev = {}, None
    for i, t in enumerate(TASKS):
        steps = {key: torch.randint(-2, 3, v.shape, generator=g) * 0.25 for key, v in pre.items()}
        if i % 2:  # task b cancels task a, task d cancels task c on the first tensor: zero elected signs
            steps["conv1.weight"] = -prev["conv1.weight"]
        prev = steps
        fts[t] = {key: (v.float() + steps[key]).to(v.dtype) if v.is_floating_point() else v for key, v in pre.items()}
    store = make_store(tmp_path, fts, pre)
    tvs = dense_tvs(pre, fts)
    expected = dense_ties(tvs, k, merge)
    got = vector("ties_merging", store, k=k, merge=merge)
    flat = torch.cat([got[key].reshape(-1) for key in store.keys])
    assert torch.equal(flat, expected)
    zero_sign = (tvs[0] == -tvs[1]) & (tvs[2] == -tvs[3])
    assert zero_sign.any()


def test_ties_rejects_bad_settings(zoo):
    _, _, store = zoo
    with pytest.raises(ValueError, match="mean"):
        vector("ties_merging", store, k=20, merge="max")
    with pytest.raises(ValueError, match="percentage"):
        vector("ties_merging", store, k=120, merge="mean")


# ---- count_over: official_encoder (the AdaMerging code's whole ImageEncoder) -----------------

@pytest.mark.parametrize("merge", ["mean", "sum"])
@pytest.mark.parametrize("k, extra", [(20, 50), (20, 400), (60, 5000), (10, 3)])
def test_official_encoder_count_trims_like_zero_padded_vectors(zoo, monkeypatch, k, extra, merge):
    """Counting ``extra`` text-side zeros equals TIES over the vectors with those zeros appended."""
    from pipeline.models import clip

    pre, fts, store = zoo
    monkeypatch.setattr(clip, "official_encoder_extra", lambda arch: {"arch-x": extra}[arch])
    tvs = dense_tvs(pre, fts)
    expected = dense_ties(torch.cat([tvs, tvs.new_zeros(len(tvs), extra)], dim=1), k, merge)[:tvs.shape[1]]
    spec = registry.method("ties_merging")
    got = spec.run(Inputs({}, store.tasks, store, arch="arch-x"),
                   spec.configure({"k": k, "merge": merge, "count_over": "official_encoder"})).vector()
    torch.testing.assert_close(torch.cat([got[key].reshape(-1) for key in store.keys]), expected, rtol=1e-6, atol=1e-7)


def test_official_encoder_count_in_the_histogram_fallback(zoo):
    """The exact select's fallback (no sample: two histogram passes) counts the zeros too."""
    from pipeline.merging.ties_merging import Ties
    from pipeline.store.streaming import merge_to_memory

    pre, fts, store = zoo
    tvs = dense_tvs(pre, fts)
    expected = dense_ties(torch.cat([tvs, tvs.new_zeros(len(tvs), 400)], dim=1), 20, "sum")[:tvs.shape[1]]
    got = merge_to_memory(store, Ties(20, "sum", sample=0, extra=400))
    assert torch.equal(torch.cat([got[key].reshape(-1) for key in store.keys]), expected)


def test_official_encoder_count_needs_the_architecture(zoo):
    _, _, store = zoo
    with pytest.raises(ValueError, match="Inputs.arch"):
        vector("ties_merging", store, count_over="official_encoder")
    with pytest.raises(ValueError, match="count_over"):
        vector("ties_merging", store, count_over="text")


def test_paper_preset_keeps_the_official_count_on_a_vit_b32_encoder(tmp_path, monkeypatch):
    """config/presets/paper.yaml's TIES on task vectors shaped like ViT-B-32's image encoder
    (87,849,216 entries) keeps what the AdaMerging code keeps over its whole ImageEncoder
    (25,599,489 more entries, zero): int(113,448,705 * 0.2) = 22,689,741 entries and those tied
    with the last (one here), 25.8% of the visual entries."""
    import open_clip
    import yaml
    from helpers.workflow import REPO
    from open_clip.model import CLIP

    from pipeline.models.clip import official_encoder_extra
    from pipeline.store import streaming
    from pipeline.store.task_vectors import write_diffs

    config = open_clip.get_model_config("ViT-B-32")
    with torch.device("meta"):
        official = CLIP(**config)
    del official.transformer
    shapes = {k.removeprefix("visual."): v.shape for k, v in official.state_dict().items() if k.startswith("visual.")}
    text_side = sum(v.numel() for k, v in official.state_dict().items() if not k.startswith("visual."))
    assert text_side == official_encoder_extra("ViT-B-32") == 25_599_489
    g = torch.Generator().manual_seed(0)
    diffs = ((k, torch.randn(s, generator=g), torch.float32) for k, s in shapes.items())
    write_diffs(tmp_path / "tv.zarr", "a", diffs, "base", "src-a", 16)
    store = TaskVectorStore(tmp_path / "tv.zarr", ["a"])
    d = store.numel()
    assert d == 87_849_216
    settings = yaml.safe_load((REPO / "config/presets/paper.yaml").read_text())["merging"]["ties_merging"]
    spec = registry.method("ties_merging")
    merge = spec.run(Inputs({}, store.tasks, store, arch="ViT-B-32", budget_mib=256), spec.configure(settings))
    monkeypatch.setattr(streaming, "COMPILE_MIN_ENTRIES", 1 << 40)  # eager: compiling costs more than this test
    kept = sum(int(v.count_nonzero()) for v in merge.vector().values())  # one task: the kept entries, as they are
    flat = torch.cat([store.read_block(key, slice(0, math.prod(store.shapes[key])))[0] for key in store.keys])
    padded = torch.cat([flat.abs(), torch.zeros(text_side)])
    n = len(padded)
    kth = padded.kthvalue(n - int(n * (20 / 100))).values  # the AdaMerging code's topk_values_mask
    assert kept == int((padded >= kth).sum())
    assert int(n * 0.2) == 22_689_741 <= kept <= 22_689_741 + 8  # fp32 magnitudes tied at the threshold
    assert round(kept / d, 3) == 0.258
