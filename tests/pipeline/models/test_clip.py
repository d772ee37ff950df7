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
