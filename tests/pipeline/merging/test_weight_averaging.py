"""Weight averaging against the mean written in dense torch."""
import torch
from helpers.merging import assert_state_close, merged


def test_weight_averaging(zoo):
    pre, fts, store = zoo
    expected = {k: torch.stack([ft[k].float() for ft in fts.values()]).mean(0).to(v.dtype)
                if v.is_floating_point() else v for k, v in pre.items()}
    got = merged("weight_averaging", pre, store)
    assert_state_close({k: v for k, v in got.items() if k != "half.weight"},
                       {k: v for k, v in expected.items() if k != "half.weight"})
    torch.testing.assert_close(got["half.weight"], expected["half.weight"], rtol=1e-3, atol=1e-3)  # fp16 rounding
