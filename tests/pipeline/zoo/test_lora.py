"""LoRA task updates: adapters on the transformer matrices only, a rank-r update, the base
weights untouched by training, and the update as a task vector."""
import pytest
import torch

from pipeline.models.clip import create_model
from pipeline.zoo.lora import add_adapters, as_task_vector, deltas, factors, target_names
from pipeline.zoo.synthetic_zoo import train_encoder


def test_adapters_train_a_rank_r_update_of_the_targets_only():
    torch.manual_seed(0)
    encoder = create_model("synth-vit-tiny").visual
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    targets = target_names(encoder)
    assert targets and all(".attn." in t or ".mlp." in t for t in targets)
    adapters = add_adapters(encoder, rank=2, alpha=4.0, seed=1)
    x = torch.randn(64, 3, 32, 32)
    y = torch.randint(0, 3, (64,))
    head = torch.nn.functional.normalize(torch.randn(3, encoder.output_dim), dim=-1)
    cfg = {"steps": 5, "batch_size": 16, "lr": 1e-2, "weight_decay": 0.0, "warmup": 1}
    train_encoder(encoder, [(head, x, y)], cfg, seed=0, progress=False)
    lora = factors(adapters)
    update = as_task_vector(before, lora)
    assert set(update) == {k for k, v in before.items() if v.is_floating_point()}
    for key, value in update.items():
        if key in targets:
            assert torch.linalg.matrix_rank(value) <= 2 and value.abs().sum() > 0
            torch.testing.assert_close(value, lora[f"{key}.lora_scale"] * lora[f"{key}.lora_B"] @ lora[f"{key}.lora_A"])
        else:
            assert not value.any(), key
    for name in targets:  # the frozen base weights did not move
        module, _, param = name.rpartition(".")
        original = encoder.get_submodule(module).parametrizations[param].original
        assert torch.equal(original, before[name])


def test_refusals_name_the_problem():
    encoder = create_model("synth-vit-tiny").visual
    with pytest.raises(ValueError, match="rank must be at least 1"):
        add_adapters(encoder, rank=0, alpha=1.0, seed=0)
    bogus = {"nope.weight.lora_A": torch.ones(1, 2), "nope.weight.lora_B": torch.ones(2, 1),
             "nope.weight.lora_scale": torch.tensor(1.0)}
    assert set(deltas(bogus)) == {"nope.weight"}
    with pytest.raises(KeyError, match="does not have"):
        as_task_vector(encoder.state_dict(), bogus)
