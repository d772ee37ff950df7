"""The AdaMerging tests' zoo: the tiny synthetic ViT, perturbed copies of it, heads and images."""
import torch

from pipeline.models.clip import create_model

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
