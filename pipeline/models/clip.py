"""open_clip models: the registered tiny synthetic architecture, its word tokenizer,
zero-shot classification heads and the image classifier used everywhere downstream."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

if TYPE_CHECKING:  # open_clip is imported where a model is built: it costs every job 2-3 s
    import open_clip

SYNTHETIC_ARCH = "synth-vit-tiny"
COUNTS = ("visual", "official_encoder")  # what TIES' top-k% of a task vector is counted over
_CONFIG_DIR = Path(__file__).parent / "configs"


def register_configs() -> None:
    """Make the project's architectures known to ``open_clip.create_model``."""
    import open_clip

    if SYNTHETIC_ARCH not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


def input_size(arch: str, missing_ok: bool = False) -> int | None:
    """The image size (pixels a side) that architecture ``arch``'s image encoder takes (None
    for an unknown one with ``missing_ok``)."""
    import open_clip

    register_configs()
    config = open_clip.get_model_config(arch)
    if config is None:
        if missing_ok:
            return None
        raise ValueError(f"unknown open_clip architecture {arch!r}; the workflow registers the architecture of a "
                         "Hugging Face CLIPModel from the model_config.json that import-pretrained writes")
    return config["vision_cfg"]["image_size"]


def official_encoder_extra(arch: str) -> int:
    """Entries of the official ``ImageEncoder`` state dict (task_vectors and AdaMerging code:
    open_clip's CLIP with its text ``transformer`` deleted) beside the visual tower: the text
    side's token embedding (vocab x width), positional embedding (context x width), final norm
    (2 x width), text projection (width x embed) and logit scale (1), from the architecture's
    open_clip config. Fine-tuning never changes them, so their task vectors are zero.
    ViT-B-32 and ViT-B-16: 25,599,489; ViT-L-14: 38,595,841 (docs/presets.md)."""
    import open_clip
    from open_clip.model import CLIPTextCfg

    register_configs()
    config = open_clip.get_model_config(arch)
    text = CLIPTextCfg(**config["text_cfg"]) if config else None
    if text is None or text.hf_model_name:
        raise ValueError(f"architecture {arch!r} has no open_clip text tower config, so the entries of its official "
                         "encoder cannot be counted; count over the visual encoder instead (count_over: visual)")
    width = text.width
    return (text.vocab_size + text.context_length + 2) * width + width * config["embed_dim"] + 1


def zeros_counted(count_over: str, arch: str | None) -> int:
    """The zero entries TIES counts with each task vector of architecture ``arch``: none over
    the visual encoder ("visual"), the official encoder's text-side ones ("official_encoder")."""
    if count_over not in COUNTS:
        raise ValueError(f"TIES' top-k% is counted over one of {COUNTS}, not {count_over!r}")
    if count_over == "visual":
        return 0
    if not arch:
        raise ValueError(f"counting TIES' top-k% over the {count_over!r} needs the zoo's architecture: pass "
                         "Inputs.arch (adamerge: arch), or count over 'visual'")
    return official_encoder_extra(arch)


class WordTokenizer:
    """Word-level tokenizer for the synthetic captions, shaped like open_clip's tokenizers.

    Ids: 0 padding, 1..V words, V+1 start, V+2 end. open_clip pools text features at the
    argmax token id, so the end token has the highest id of any sequence.
    """

    def __init__(self, vocab: Sequence[str], context_length: int):
        self.vocab = list(vocab)
        self.index = {w: i + 1 for i, w in enumerate(self.vocab)}
        self.sot, self.eot = len(self.vocab) + 1, len(self.vocab) + 2
        self.context_length = context_length

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            try:
                ids = [self.sot] + [self.index[w] for w in text.split()] + [self.eot]
            except KeyError as err:
                raise ValueError(f"word {err} of {text!r} is not in the synthetic vocabulary") from None
            if len(ids) > self.context_length:
                raise ValueError(f"caption {text!r} is longer than context_length={self.context_length}")
            out[i, : len(ids)] = torch.tensor(ids)
        return out


class _NoRandomInitWarning(logging.Filter):
    """Drops open_clip's warning that a model built without weights is initialised randomly."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


_NO_RANDOM_INIT_WARNING = _NoRandomInitWarning()


def create_model(arch: str, seed: int | None = None) -> open_clip.model.CLIP:
    """A randomly initialised open_clip CLIP of architecture ``arch``. Callers load weights
    next or want random ones, so open_clip's warning that no pretrained weights were loaded
    (on the root logger) is dropped; other records pass."""
    import open_clip

    register_configs()
    if seed is not None:
        torch.manual_seed(seed)
    root = logging.getLogger()
    root.addFilter(_NO_RANDOM_INIT_WARNING)
    try:
        return open_clip.create_model(arch, pretrained=None)
    finally:
        root.removeFilter(_NO_RANDOM_INIT_WARNING)


@torch.no_grad()
def zero_shot_weights(
    model: open_clip.model.CLIP,
    tokenizer: Callable[[Sequence[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    device: torch.device | str | None = None,
    chunk: int = 512,
) -> torch.Tensor:
    """Zero-shot head weights as in the task_vectors code: for each class the normalised mean of
    the normalised text embeddings of all its prompts, scaled by the model's logit scale.

    All classes' prompts are encoded in batches of ``chunk`` on ``device`` (the model is moved
    there; None: where it is), with a progress bar when that takes over 2 s; the head comes
    back on the CPU."""
    model.eval()
    if device is not None:
        model.to(device)
    device = model.logit_scale.device
    prompts = [t.format(name) for name in classnames for t in templates]
    embeddings = [
        F.normalize(model.encode_text(tokenizer(prompts[s : s + chunk]).to(device)), dim=-1)
        for s in tqdm(range(0, len(prompts), chunk), desc="zero-shot head", unit="chunk", delay=2, mininterval=2)
    ]
    mean = torch.cat(embeddings).view(len(classnames), len(templates), -1).mean(1)
    return (model.logit_scale.exp() * F.normalize(mean, dim=-1)).cpu()


class ImageClassifier(nn.Module):
    """An image encoder followed by a frozen zero-shot head on normalised features."""

    def __init__(self, encoder: nn.Module, head_weight: torch.Tensor):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("head", head_weight.detach().clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return logits(self.encoder(images), self.head)


def logits(features: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Class logits of image features through a zero-shot head."""
    return F.normalize(features, dim=-1) @ head.t()
