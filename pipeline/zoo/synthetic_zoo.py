"""Build the embedded synthetic CLIP zoo: task datasets, contrastive pretraining and
per-task fine-tuning of the image encoder through a frozen zero-shot head.

The zoo is written in the formats of real zoos (safetensors state dicts, head tensors,
a JSON manifest), so no later stage can tell it from a real one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.data import synthetic as syn
from pipeline.data.synthetic import to_tensor
from pipeline.models.clip import WordTokenizer, create_model, logits, zero_shot_weights


def digit_pools(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's real digits split 60/20/20 into train/val/test glyph pools."""
    x, y = syn._digits()
    order = np.random.default_rng(seed).permutation(len(x))
    cut1, cut2 = int(0.6 * len(x)), int(0.8 * len(x))
    parts = {"train": order[:cut1], "val": order[cut1:cut2], "test": order[cut2:]}
    return {k: (x[v], y[v]) for k, v in parts.items()}


def build_task_data(task: str, seed: int, sizes: dict[str, int], domains: dict) -> dict[str, np.ndarray]:
    """Train/val/test images and labels of one synthetic task, deterministic in (task, seed)."""
    if task not in syn.ATTRIBUTES:
        raise ValueError(f"unknown synthetic task {task!r}; known: {sorted(syn.ATTRIBUTES)}")
    overlay = syn.OVERLAY_OF.get(task)
    pools = digit_pools(seed)
    domain = syn.task_domain(task, seed, domains.get("shared", {}), domains.get("specific", {}))
    base = int.from_bytes(task.encode(), "little") % 100_000
    out: dict[str, np.ndarray] = {}
    for i, split in enumerate(["train", "val", "test"]):
        split_seed = seed * 1_000_003 + base * 7 + i
        scenes = syn.render(sizes[split], split_seed, overlay=overlay, digit_pool=pools[split])
        out[f"x_{split}"] = syn.apply_domain(scenes.images, domain, split_seed + 1)
        out[f"y_{split}"] = scenes.labels[task].astype(np.int64)
    return out


def _lr_lambda(warmup: int, steps: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return f


def pretraining_corpus(n: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Scenes for contrastive pretraining: 70% plain, 15% with a bar, 15% with a digit;
    attributes absent from an image are labelled -1."""
    pools = digit_pools(seed)
    parts = [
        syn.render(int(n * 0.7), seed * 31 + 1),
        syn.render(int(n * 0.15), seed * 31 + 2, overlay="bar"),
        syn.render(n - int(n * 0.7) - int(n * 0.15), seed * 31 + 3, overlay="digit", digit_pool=pools["train"]),
    ]
    images = np.concatenate([p.images for p in parts])
    labels = {}
    for name in syn.ATTRIBUTES:
        labels[name] = np.concatenate([p.labels.get(name, np.full(len(p.images), -1)) for p in parts])
    return images, labels


def _positives(labels: dict[str, np.ndarray], parts: list[list[tuple[str, int]]]) -> torch.Tensor:
    """P[i, j] = image i has every attribute value named in caption j."""
    n = len(parts)
    pos = np.ones((n, n), bool)
    for j, pairs in enumerate(parts):
        for attr, cls in pairs:
            pos[:, j] &= labels[attr] == cls
    return torch.from_numpy(pos).float()


def pretrain(cfg: dict, seed: int, progress: bool = True):
    """Contrastive pretraining with a multi-positive loss (every image matching a caption
    is a positive, so repeated attribute values are no false negatives).

    ``cfg["final_logit_scale"]`` (when set) replaces the learned logit scale at the end, as
    OpenAI's CLIP ends at its clamp of 100: zero-shot heads carry the scale, so it sets how
    sharp the predictions are whose entropy AdaMerging minimises."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = create_model(cfg["arch"], seed=seed)
    tokenizer = WordTokenizer(syn.vocabulary(), model.context_length)
    images, labels = pretraining_corpus(cfg["corpus"], seed)
    x_all = to_tensor(images)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg["warmup"], cfg["steps"]))
    model.train()
    bar = tqdm(range(cfg["steps"]), desc="pretrain", disable=not progress, mininterval=2)
    for _ in bar:
        idx = rng.choice(len(x_all), cfg["batch_size"], replace=False)
        batch_labels = {k: v[idx] for k, v in labels.items()}
        present = {k: v for k, v in batch_labels.items()}
        captions, parts = _caption_present(present, rng)
        pos = _positives(batch_labels, parts)
        img = F.normalize(model.encode_image(x_all[idx]), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
        sim = model.logit_scale.exp() * img @ txt.t()
        loss = 0.5 * (
            torch.sum(-(pos / pos.sum(1, keepdim=True)) * sim.log_softmax(1), 1).mean()
            + torch.sum(-(pos / pos.sum(0, keepdim=True)).t() * sim.t().log_softmax(1), 1).mean()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    if cfg.get("final_logit_scale"):
        with torch.no_grad():
            model.logit_scale.fill_(math.log(cfg["final_logit_scale"]))
    model.eval()
    return model, tokenizer


def _caption_present(labels: dict[str, np.ndarray], rng: np.random.Generator):
    """Captions built only from the attributes each image carries (label >= 0)."""
    captions, parts = [], []
    n = len(next(iter(labels.values())))
    for i in range(n):
        row = {k: v[i : i + 1] for k, v in labels.items() if v[i] >= 0}
        c, p = syn.caption_batch(row, rng)
        captions.append(c[0])
        parts.append(p[0])
    return captions, parts


def zero_shot_head(model, tokenizer, task: str) -> torch.Tensor:
    """Frozen zero-shot head of a synthetic task from its class names and templates."""
    attr = syn.ATTRIBUTES[task]
    return zero_shot_weights(model, tokenizer, attr.classnames, attr.templates)


def train_encoder(encoder: torch.nn.Module, tasks: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                  cfg: dict, seed: int, desc: str = "finetune", progress: bool = True) -> dict[str, torch.Tensor]:
    """Train an image encoder through frozen heads on ``tasks`` (head, images, labels): each step
    one batch per task, the mean of the tasks' cross-entropies; AdamW with warm-up then cosine
    (``cfg``: steps, batch_size, lr, weight_decay, warmup). Returns its state dict."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(encoder.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg["warmup"], cfg["steps"]))
    encoder.train()
    bar = tqdm(range(cfg["steps"]), desc=desc, disable=not progress, mininterval=2)
    for _ in bar:
        loss = 0.0
        for head, x, y in tasks:
            idx = torch.randint(0, len(x), (cfg["batch_size"],), generator=gen)
            loss = loss + F.cross_entropy(logits(encoder(x[idx]), head), y[idx]) / len(tasks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    encoder.eval()
    return {k: v.detach().clone() for k, v in encoder.state_dict().items()}


def finetune(encoder: torch.nn.Module, head: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
             cfg: dict, seed: int, desc: str = "finetune", progress: bool = True) -> dict[str, torch.Tensor]:
    """Fine-tune an image encoder on one task through its frozen head; returns its state dict."""
    return train_encoder(encoder, [(head, x, y)], cfg, seed, desc, progress)
