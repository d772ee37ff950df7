"""The synthetic zoo: task datasets (labels, determinism, per-task domains, disjoint digits), and
pretraining and fine-tuning that are deterministic and do what they claim."""

import copy
import hashlib

import numpy as np
import pytest
import torch

from pipeline.data import synthetic as syn
from pipeline.data.synthetic import to_tensor
from pipeline.models.checkpoints import state_dict_hash
from pipeline.zoo.synthetic_zoo import build_task_data, finetune, pretrain, zero_shot_head

SIZES = {"train": 64, "val": 32, "test": 32}
DOMAINS = {"shared": {"noise": 0.1, "contrast": 0.7}, "specific": {"hue_shift": 0.5, "texture": 0.1}}
PRETRAIN = dict(arch="synth-vit-tiny", corpus=256, steps=3, batch_size=32, lr=1e-3, weight_decay=0.1, warmup=1)
FINETUNE = dict(steps=3, batch_size=16, lr=1e-3, weight_decay=0.0, warmup=1)


def digest(data: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(data):
        h.update(k.encode() + data[k].tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("task", ["colour", "digit", "orientation"])
def test_task_data_is_deterministic_in_the_seed(task):
    a = build_task_data(task, 0, SIZES, DOMAINS)
    b = build_task_data(task, 0, SIZES, DOMAINS)
    c = build_task_data(task, 1, SIZES, DOMAINS)
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)
    assert {k: v.shape[0] for k, v in a.items()} == {f"{p}_{s}": n for s, n in SIZES.items() for p in "xy"}


def test_splits_differ_and_tasks_have_their_own_domain():
    a = build_task_data("border", 0, SIZES, DOMAINS)
    assert not np.array_equal(a["x_train"][:32], a["x_test"])
    d1 = syn.task_domain("border", 0, DOMAINS["shared"], DOMAINS["specific"])
    d2 = syn.task_domain("stripes", 0, DOMAINS["shared"], DOMAINS["specific"])
    assert d1 != d2 and d1.texture_seed != d2.texture_seed


def test_digit_splits_use_disjoint_real_digits():
    from pipeline.zoo.synthetic_zoo import digit_pools

    pools = digit_pools(0)
    train = {x.tobytes() for x in pools["train"][0]}
    assert not any(x.tobytes() in train for x in pools["test"][0])
    assert sum(len(p[1]) for p in pools.values()) == 1797


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="unknown synthetic task 'dogs'"):
        build_task_data("dogs", 0, SIZES, DOMAINS)


def test_pretraining_is_deterministic_in_the_seed():
    a, _ = pretrain(PRETRAIN, seed=3, progress=False)
    b, _ = pretrain(PRETRAIN, seed=3, progress=False)
    c, _ = pretrain(PRETRAIN, seed=4, progress=False)
    assert state_dict_hash(a.state_dict()) == state_dict_hash(b.state_dict())
    assert state_dict_hash(a.state_dict()) != state_dict_hash(c.state_dict())


def test_finetuning_changes_only_the_encoder_deterministically():
    model, tok = pretrain(PRETRAIN, seed=0, progress=False)
    head = zero_shot_head(model, tok, "colour")
    assert head.shape == (len(syn.COLOURS), 64)
    data = build_task_data("colour", 0, {"train": 64, "val": 16, "test": 16}, {})
    x, y = to_tensor(data["x_train"]), torch.from_numpy(data["y_train"])
    before = copy.deepcopy(model.visual.state_dict())
    sd1 = finetune(copy.deepcopy(model.visual), head, x, y, FINETUNE, seed=7, progress=False)
    sd2 = finetune(copy.deepcopy(model.visual), head, x, y, FINETUNE, seed=7, progress=False)
    assert state_dict_hash(sd1) == state_dict_hash(sd2)
    assert state_dict_hash(sd1) != state_dict_hash(before)
    assert sd1.keys() == before.keys()
