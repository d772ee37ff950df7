"""Pretraining and fine-tuning of the synthetic zoo are deterministic and do what they claim."""

import copy

import torch

from pipeline.data import synthetic as syn
from pipeline.data.synthetic import to_tensor
from pipeline.models.checkpoints import state_dict_hash
from pipeline.zoo.synthetic_zoo import build_task_data, finetune, pretrain, zero_shot_head

PRETRAIN = dict(arch="synth-vit-tiny", corpus=256, steps=3, batch_size=32, lr=1e-3, weight_decay=0.1, warmup=1)
FINETUNE = dict(steps=3, batch_size=16, lr=1e-3, weight_decay=0.0, warmup=1)


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
