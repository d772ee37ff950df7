"""The AdaMerging tests' zoo: the tiny synthetic ViT, perturbed copies of it, heads and images."""
import json

import numpy as np
import torch
from safetensors.torch import save_file

from pipeline.models.checkpoints import save_state_dict
from pipeline.models.clip import create_model
from pipeline.zoo.store import save_head

K, CLASSES, DIM = 3, 5, 64


def perturbed_zoo():
    """A pretrained tiny encoder, K randomly perturbed fine-tuned ones, heads and images."""
    torch.manual_seed(0)
    encoder = create_model("synth-vit-tiny", seed=0).visual.eval()
    pre = {k: v.clone() for k, v in encoder.state_dict().items()}
    finetuned = [{k: v + 0.05 * v.std().nan_to_num(1.0) * torch.randn_like(v) for k, v in pre.items()}
                 for _ in range(K)]
    heads = [20 * torch.nn.functional.normalize(torch.randn(CLASSES, DIM), dim=-1) for _ in range(K)]
    images = [torch.randn(32, 3, 32, 32) for _ in range(K)]
    return encoder, pre, finetuned, heads, images


def verb_inputs(tmp_path, finetuned, heads) -> list[str]:
    """The options shared by the test-time verbs (adamerge, adapt) for two synthetic tasks "a"
    and "b" of 20 test images, their files written under ``tmp_path``."""
    clip = create_model("synth-vit-tiny", seed=0)
    save_state_dict(clip.state_dict(), tmp_path / "pretrained.safetensors")
    files = {"finetuned": [], "heads": [], "data": []}
    rng = np.random.default_rng(0)
    for t in range(2):
        save_file(finetuned[t], tmp_path / f"ft{t}.safetensors")  # as given, unchecked
        save_head(heads[t], tmp_path / f"head{t}.safetensors")
        np.savez(tmp_path / f"t{t}.npz", x_test=rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8),
                 y_test=np.zeros(20, dtype=np.int64))
        files["finetuned"].append(str(tmp_path / f"ft{t}.safetensors"))
        files["heads"].append(str(tmp_path / f"head{t}.safetensors"))
        files["data"].append(str(tmp_path / f"t{t}.npz"))
    zoo_cfg = {"name": "t", "source": "synthetic", "arch": "synth-vit-tiny", "seed": 0}
    return ["--zoo", json.dumps(zoo_cfg), "--pretrained", str(tmp_path / "pretrained.safetensors"),
            "--finetuned", *files["finetuned"], "--heads", *files["heads"], "--tasks", "a", "b",
            "--data", *files["data"], "--device", "cpu"]
