"""The streamed merges: a saved StreamedMerge equals the in-memory one; the task-routed merge
file (RoutedMerge): bit packing, the tasks it answers for, its route into an encoder, and its
refusals."""
import pytest
import torch
from helpers.merging import make_store, routed_states
from helpers.store import make_store as make_values_store
from helpers.store import task_vectors
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.merging import registry
from pipeline.merging.contract import Inputs
from pipeline.merging.streamed import pack_bits, route, task_states, unpack_bits


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_bits_round_trip(n):
    bits = torch.rand(3, n, generator=torch.Generator().manual_seed(n)) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, -(-n // 8))
    assert all(torch.equal(unpack_bits(row, n), b) for row, b in zip(packed, bits))
    assert int(pack_bits(torch.tensor([[True] + [False] * 7]))[0, 0]) == 1  # entry 8 b + j is bit j of byte b


def test_task_states_follow_the_tasks_asked_for(zoo, tmp_path):
    pre, _, store = zoo
    states, _ = routed_states("emr_merging", pre, store, tmp_path / "m.safetensors")
    again = list(task_states(tmp_path / "m.safetensors", pre, ["c", "a"]))
    assert all(torch.equal(again[0][k], states[2][k]) and torch.equal(again[1][k], states[0][k]) for k in pre)
    assert torch.equal(states[0]["ids"], pre["ids"]) and states[0]["half.weight"].dtype == torch.float16
    with pytest.raises(ValueError, match=r"holds the masks of tasks \['a', 'b', 'c', 'd'\], not of \['x'\]"):
        next(task_states(tmp_path / "m.safetensors", pre, ["a", "x"]))
    with pytest.raises(ValueError, match=r"tensors the pretrained encoder lacks, e\.g\. \['conv1\.weight'\]"):
        next(task_states(tmp_path / "m.safetensors", {k: v for k, v in pre.items() if k != "conv1.weight"}, ["a"]))
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="plain.safetensors is no task-routed merge"):
        next(task_states(tmp_path / "plain.safetensors", pre, ["a"]))


def test_route_loads_each_task_into_the_encoder(tmp_path):
    """A real module: route yields the encoder itself holding task t's weights, in task order;
    non-floating buffers and the other tasks' weights are untouched by it."""
    encoder = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3))
    pre = {k: v.clone() for k, v in encoder.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    fts = {t: {k: v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in pre.items()}
           for t in ("a", "b")}
    store = make_store(tmp_path, fts, pre)
    states, _ = routed_states("tall_masks", pre, store, tmp_path / "tall.safetensors")
    seen = []
    for task_encoder, expected in zip(route(tmp_path / "tall.safetensors", encoder, ["a", "b"]), states):
        assert task_encoder is encoder
        seen.append({k: v.clone() for k, v in encoder.state_dict().items()})
        assert all(torch.equal(seen[-1][k], expected[k]) for k in expected)
    assert len(seen) == 2 and not torch.equal(seen[0]["0.weight"], seen[1]["0.weight"])


def test_a_routed_merge_has_no_single_state_dict(zoo):
    pre, _, store = zoo
    spec = registry.method("tall_masks")
    with pytest.raises(TypeError, match="one encoder per task"):
        spec.run(Inputs(pre, store.tasks, store), spec.configure()).state_dict()


@pytest.mark.parametrize("name, settings", [("dare", {"base": "ties", "p": 0.2, "k": 50}), ("consensus_ta", {}),
                                            ("consensus_ties", {"k": 50})])
def test_a_saved_streamed_merge_equals_the_in_memory_one(tmp_path, name, settings):
    """save() (written chunk by chunk, TIES' patches applied to the file) = state_dict(), on task
    vectors with exact sign cancellations under a negative majority (which TIES patches)."""
    values = task_vectors("levels", k=4, seed=5) - 0.5
    values[1, :300] = -values[0, :300]
    values[3, :300] = -values[2, :300]
    store = make_values_store(tmp_path / "s", values, chunk_elems=37)
    pre = {k: torch.randn(store.shapes[k]) for k in store.keys}
    spec = registry.method(name)
    merge = spec.run(Inputs(pre, store.tasks, store), spec.configure(settings))
    merge.save(tmp_path / "m.safetensors")
    written, in_memory = load_file(tmp_path / "m.safetensors"), merge.state_dict()
    assert all(torch.equal(written[k], in_memory[k]) for k in pre)
