"""The word tokenizer of the synthetic CLIP; the official image encoder's text-side entries."""

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


@pytest.mark.parametrize("arch, extra", [("ViT-B-32", 25_599_489), ("ViT-B-16", 25_599_489),
                                         ("ViT-L-14", 38_595_841), ("ViT-B-32-quickgelu", 25_599_489),
                                         ("synth-vit-tiny", 13_697)])
def test_official_encoder_extra_counts_the_text_side_of_the_official_image_encoder(arch, extra):
    """The task_vectors / AdaMerging ImageEncoder: open_clip's CLIP with its text transformer
    deleted; every entry of its state dict outside ``visual.`` is counted."""
    import open_clip
    import torch
    from open_clip.model import CLIP

    from pipeline.models.clip import official_encoder_extra, register_configs

    register_configs()
    with torch.device("meta"):
        model = CLIP(**open_clip.get_model_config(arch))
    del model.transformer
    state = model.state_dict()
    assert {k for k in state if not k.startswith("visual.")} == {
        "positional_embedding", "text_projection", "logit_scale", "token_embedding.weight", "ln_final.weight",
        "ln_final.bias"}
    assert official_encoder_extra(arch) == sum(v.numel() for k, v in state.items() if not k.startswith("visual.")) \
        == extra
    with pytest.raises(ValueError, match="count_over: visual"):
        official_encoder_extra("no-such-arch")
