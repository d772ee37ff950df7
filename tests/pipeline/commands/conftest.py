"""The command tests' fabricated zoo: a pretrained CLIP, heads, "fine-tuned" encoders and task data
in the zoo's on-disk formats."""
import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def fake_zoo(tmp_path_factory):
    """Pretrained CLIP, heads, 'fine-tuned' encoders (pretrained + noise) and task data in the
    zoo's on-disk formats: exercises the verbs without training."""
    from pipeline.models.checkpoints import save_state_dict
    from pipeline.models.clip import create_model

    root = tmp_path_factory.mktemp("zoo")
    model = create_model("synth-vit-tiny", seed=0)
    save_state_dict(model.state_dict(), root / "pretrained.safetensors")
    rng = np.random.default_rng(0)
    for i, task in enumerate(("colour", "border")):
        g = torch.Generator().manual_seed(i)
        save_state_dict({"weight": torch.randn(3, 64, generator=g)}, root / f"{task}.head.safetensors")
        save_state_dict({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in model.visual.state_dict().items()},
                        root / f"{task}.safetensors")
        np.savez(root / f"{task}.npz", **{f"{p}_{s}": a for s, n in (("train", 24), ("val", 12), ("test", 12))
                                          for p, a in (("x", rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)),
                                                       ("y", rng.integers(0, 3, n)))})
    return root
