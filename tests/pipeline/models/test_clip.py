"""The word tokenizer of the synthetic CLIP."""

import pytest

from pipeline.data import synthetic as syn
from pipeline.models.clip import WordTokenizer


def test_tokenizer_covers_every_prompt_and_ends_with_the_highest_id():
    tok = WordTokenizer(syn.vocabulary(), 20)
    for attr in syn.ATTRIBUTES.values():
        ids = tok([t.format(c) for t in attr.templates for c in attr.classnames])
        assert (ids.argmax(1) == (ids > 0).sum(1) - 1).all()  # end token is the argmax
    with pytest.raises(ValueError, match="not in the synthetic vocabulary"):
        tok("purple elephant")


def test_batched_zero_shot_weights_equal_the_per_class_computation():
    import torch
    import torch.nn.functional as F

    from pipeline.models.clip import create_model, zero_shot_weights

    model = create_model("synth-vit-tiny", seed=0)
    tok = WordTokenizer(syn.vocabulary(), model.context_length)
    for attr in syn.ATTRIBUTES.values():
        with torch.no_grad():  # the task_vectors code: one class at a time
            rows = [F.normalize(F.normalize(model.encode_text(tok([t.format(c) for t in attr.templates])), dim=-1)
                                .mean(0), dim=-1) for c in attr.classnames]
            reference = model.logit_scale.exp() * torch.stack(rows)
        for chunk in (512, 7):  # one batch; batches that split a class's prompts
            head = zero_shot_weights(model, tok, attr.classnames, attr.templates, device="cpu", chunk=chunk)
            assert head.shape == reference.shape and head.device.type == "cpu"
            torch.testing.assert_close(head, reference, rtol=0, atol=1e-5)
