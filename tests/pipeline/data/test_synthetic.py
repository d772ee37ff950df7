"""The synthetic scenes and task datasets: labels, determinism and per-task domains."""

import hashlib

import numpy as np
import pytest

from pipeline.data import synthetic as syn
from pipeline.models.clip import WordTokenizer
from pipeline.zoo.synthetic_zoo import build_task_data

SIZES = {"train": 64, "val": 32, "test": 32}
DOMAINS = {"shared": {"noise": 0.1, "contrast": 0.7}, "specific": {"hue_shift": 0.5, "texture": 0.1}}


def digest(data: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(data):
        h.update(k.encode() + data[k].tobytes())
    return h.hexdigest()


def test_render_labels_are_in_range_and_images_uint8():
    scenes = syn.render(200, seed=1, overlay="bar")
    assert scenes.images.shape == (200, 32, 32, 3) and scenes.images.dtype == np.uint8
    for name, labels in scenes.labels.items():
        assert labels.min() >= 0 and labels.max() < len(syn.ATTRIBUTES[name].classnames)
    # every class of every attribute appears in a batch this size
    assert all(len(np.unique(v)) == len(syn.ATTRIBUTES[k].classnames) for k, v in scenes.labels.items())


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


def test_tokenizer_covers_every_prompt_and_ends_with_the_highest_id():
    tok = WordTokenizer(syn.vocabulary(), 20)
    for attr in syn.ATTRIBUTES.values():
        ids = tok([t.format(c) for t in attr.templates for c in attr.classnames])
        assert (ids.argmax(1) == (ids > 0).sum(1) - 1).all()  # end token is the argmax
    with pytest.raises(ValueError, match="not in the synthetic vocabulary"):
        tok("purple elephant")
