"""The merging method tests' task-vector zoo: four fine-tuned copies of a small state dict, in a store."""
import pytest
from helpers.merging import TASKS, make_store
from helpers.store import encoder_state, finetune


@pytest.fixture
def zoo(tmp_path):
    pre = encoder_state()
    fts = {t: finetune(pre, i + 1) for i, t in enumerate(TASKS)}
    return pre, fts, make_store(tmp_path, fts, pre)
