"""Representation Surgery (Yang et al., Representation Surgery for Multi-Task Model Merging,
ICML 2024): on top of a merged encoder, one low-rank module per task on its final
representation,

    z_hat = z - W_up ReLU(W_down z),   W_down (r, D), W_up (D, r),

trained so that z_hat of the merged encoder matches the task's own fine-tuned encoder's
features in L1 on unlabeled test images. The merged encoder is frozen, so both encoders'
features of the (at most ``max_images``) test images are computed once, in one pass each,
and training runs on the cached features: all tasks' modules in one batched step (Adam is
elementwise, so one optimizer over the stacked (K, ...) tensors is K independent ones).

A merge is its base merge (a file of another registry method) and per task a small file
with that task's W_down and W_up; a manifest (JSON) names them, and :func:`route` encodes
task t with the base encoder followed by module t.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from pipeline.merging.adamerging import CHECK_EVERY, draw_batches
from pipeline.merging.contract import Images, Inputs, StateDict

MODULES = "modules"  # folder of the per-task files, beside the manifest


@dataclass(frozen=True)
class Settings:
    """Surgery hyper-parameters. ``base``: the registry method whose merge it corrects
    (layer-wise AdaMerging: the paper's headline, 80.2 -> 86.1 on 8 ViT-B/32 tasks). From the
    official code (EnnengYang/RepresentationSurgery, src/merging_model.py and
    src/main_*_with_surgery.py): ``rank`` 16, W_down Kaiming-uniform (a = sqrt 5, as
    nn.Linear), W_up zero (it starts at the base merge), Adam ``lr`` 1e-3, ``betas`` (0.9,
    0.999), no weight decay, L1 loss on the unnormalised image features; 500 iterations of 2
    batches of 16 images per task with an Adam step each: ``steps`` 1000 of ``batch_size``
    16. ``encode_batch``: images per forward pass when the features are cached."""

    base: str = "adamerging_layer_wise"
    rank: int = 16
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    steps: int = 1000
    batch_size: int = 16
    encode_batch: int = 256
    seed: int = 0

    def __post_init__(self):
        if self.rank < 1 or self.steps < 0 or self.batch_size < 1 or self.encode_batch < 1:
            raise ValueError(f"Surgery settings need rank, batch_size, encode_batch >= 1 and steps >= 0: {self}")


class SurgeryModules(nn.Module):
    """K tasks' modules as stacked tensors: ``down`` (K, r, D), ``up`` (K, D, r)."""

    def __init__(self, n_tasks: int, dim: int, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        down = torch.empty(n_tasks, rank, dim)
        bound = 1 / math.sqrt(dim)  # kaiming_uniform_(a=sqrt(5)) of a (rank, dim) Linear weight
        down.uniform_(-bound, bound, generator=generator)
        self.down = nn.Parameter(down)
        self.up = nn.Parameter(torch.zeros(n_tasks, dim, rank))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (K, B, D): each task's features through its module."""
        return z - torch.relu(z @ self.down.transpose(1, 2)) @ self.up.transpose(1, 2)


class SurgeryEncoder(nn.Module):
    """One task's model: the base encoder followed by its module."""

    def __init__(self, encoder: nn.Module, down: torch.Tensor, up: torch.Tensor):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("down", down)
        self.register_buffer("up", up)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        z = self.encoder(images)
        return z - torch.relu(z @ self.down.t().to(z.dtype)) @ self.up.t().to(z.dtype)


@torch.no_grad()
def encode(encoder: nn.Module, images: Images, batch: int, device: torch.device, desc: str,
           progress: bool = True) -> torch.Tensor:
    """(N, D) float32 features of all ``images`` (read ``batch`` rows at a time), on ``device``."""
    encoder.eval()
    starts = range(0, len(images), batch)
    parts = [encoder(images[torch.arange(s, min(s + batch, len(images)))].to(device)).float()
             for s in tqdm(starts, desc=desc, disable=not progress, mininterval=2)]
    return torch.cat(parts)


def train(merged: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], settings: Settings = Settings(),
          progress: bool = True) -> tuple[SurgeryModules, list[list[float]]]:
    """Fit the modules: per step a fresh random batch of each task's cached (merged, target)
    feature pairs, loss the sum over tasks of the mean L1 distance, one Adam step. Returns the
    modules and per step each task's loss."""
    s = settings
    device = merged[0].device
    generator = torch.Generator().manual_seed(s.seed)
    modules = SurgeryModules(len(merged), merged[0].shape[1], s.rank, generator).to(device)
    fused = device.type in ("cpu", "cuda") or None
    optimizer = torch.optim.Adam(modules.parameters(), lr=s.lr, betas=tuple(float(b) for b in s.betas),
                                 weight_decay=0.0, fused=fused)
    pairs = [torch.stack([m, t], 1) for m, t in zip(merged, targets, strict=True)]  # (N, 2, D): drawn together
    take = min(s.batch_size, *(len(p) for p in pairs))
    losses = []
    for step in tqdm(range(s.steps), desc="surgery", disable=not progress, mininterval=2):
        batch, _ = draw_batches(pairs, take, 1, generator)
        batch = batch.view(len(pairs), take, 2, -1)
        loss = (modules(batch[:, :, 0]) - batch[:, :, 1]).abs().mean((1, 2))  # (K,)
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()
        losses.append(loss.detach())
        if (step + 1) % CHECK_EVERY == 0 and not bool(torch.isfinite(torch.stack(losses[-CHECK_EVERY:])).all()):
            raise FloatingPointError(f"Surgery: the L1 loss is not finite by step {step + 1} (lr {s.lr:g}); lower lr "
                                     "(the paper's is 1e-3) or check the encoders for NaN or Inf")
    return modules, torch.stack(losses).cpu().tolist() if losses else []


@dataclass
class Result:
    """A trained Surgery: per task its module, the loss curve, the base merge it corrects
    (its file, or its weights), what it adds."""

    tasks: list[str]
    modules: SurgeryModules
    losses: list[list[float]]  # per step, per task
    base: str | Path | StateDict
    settings: Settings
    details: dict = field(default_factory=dict)

    def state_dict(self) -> StateDict:
        """The modules, ``{task}.down`` (r, D) and ``{task}.up`` (D, r)."""
        out = {}
        for k, task in enumerate(self.tasks):
            out[f"{task}.down"] = self.modules.down[k].detach().cpu()
            out[f"{task}.up"] = self.modules.up[k].detach().cpu()
        return out

    def loss_table(self) -> pd.DataFrame:
        return pd.DataFrame([{"step": step, "task": task, "l1": v} for step, row in enumerate(self.losses)
                             for task, v in zip(self.tasks, row)])

    def added_parameters(self) -> int:
        return self.modules.down.numel() + self.modules.up.numel()

    def save(self, path: str | Path) -> dict:
        """The manifest ``path`` (JSON), each task's module in ``modules/{task}.safetensors``
        beside it and, when the base merge is no file, its weights in ``base.safetensors``."""
        from pipeline.io import write_json
        from pipeline.models.checkpoints import save_state_dict

        folder = Path(path).parent
        state = self.state_dict()
        files = {}
        for task in self.tasks:
            files[task] = f"{MODULES}/{task}.safetensors"
            save_state_dict({"down": state[f"{task}.down"], "up": state[f"{task}.up"]}, folder / files[task])
        if isinstance(self.base, Mapping):
            save_state_dict(self.base, folder / "base.safetensors")
            base = "base.safetensors"
        else:
            base = Path(os.path.relpath(Path(self.base).resolve(), folder.resolve())).as_posix()
        write_json({"method": "surgery", "base_method": self.settings.base, "base": base, "modules": files,
                    "rank": self.settings.rank, "added_parameters": self.added_parameters(), **self.details}, path)
        return {}


def surgery(encoder: nn.Module, base: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
            images: Sequence[Images], settings: Settings = Settings(), device: torch.device | str | None = None,
            progress: bool = True, tasks: Sequence[str] = ()) -> tuple[SurgeryModules, list[list[float]]]:
    """Cache the features of each task's images under the ``base`` merge and under the task's
    own fine-tuned encoder (``encoder`` takes each set of weights in turn), then train the
    modules (:func:`train`)."""
    if not len(finetuned) == len(images) >= 1:
        raise ValueError(f"Surgery needs as many image sets ({len(images)}) as fine-tuned models ({len(finetuned)}), "
                         "at least one")
    tasks = list(tasks) or [str(k) for k in range(len(images))]
    for task, x in zip(tasks, images):
        if len(x) == 0:
            raise ValueError(f"Surgery: task {task!r} has no unlabeled test image")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = encoder.to(device).requires_grad_(False)
    encoder.load_state_dict(base)
    merged = [encode(encoder, x, settings.encode_batch, device, f"surgery: base features {t}", progress)
              for t, x in zip(tasks, images)]
    targets = []
    for k, (task, x) in enumerate(zip(tasks, images)):
        encoder.load_state_dict(finetuned[k])  # one fine-tuned model at a time
        targets.append(encode(encoder, x, settings.encode_batch, device, f"surgery: own features {task}", progress))
    return train(merged, targets, settings, progress)


def run(inputs: Inputs, settings: Settings = Settings()) -> Result:
    """The registry entry point: Surgery over ``inputs.base`` (a saved merge of
    ``settings.base``), or over that method's merge computed from ``inputs`` when it is None."""
    from pipeline.merging import registry  # the registry lists this module

    spec = registry.method(settings.base)
    if spec.route is not None or spec.per_task:
        raise ValueError(f"Surgery's base {settings.base!r} is no single merged encoder; name a method with one "
                         "merged model, e.g. adamerging_layer_wise or ties_merging")
    if inputs.base is not None:
        from pipeline.zoo.store import load_encoder_state

        base: str | Path | StateDict = inputs.base
        weights = load_encoder_state(inputs.base)
    else:
        weights = base = spec.run(inputs, spec.configure()).state_dict()
    modules, losses = surgery(inputs.encoder, weights, inputs.finetuned, inputs.test, settings, device=inputs.device,
                              progress=inputs.progress, tasks=inputs.tasks)
    return Result(list(inputs.tasks) or [str(k) for k in range(len(inputs.test))], modules, losses, base, settings)


def load(path: str | Path) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    """The base merge's file and each task's module of the manifest ``path``."""
    from pipeline.models.checkpoints import load_safetensors

    folder = Path(path).parent
    manifest = json.loads(Path(path).read_text())
    if manifest.get("method") != "surgery":
        raise ValueError(f"{path} is no Surgery manifest (method {manifest.get('method')!r}); pass the model.json "
                         "that the surgery job wrote")
    return folder / manifest["base"], {t: load_safetensors(folder / f) for t, f in manifest["modules"].items()}


def route(path: str | Path, encoder: nn.Module, tasks: Sequence[str]) -> Iterator[nn.Module]:
    """Evaluation of a saved Surgery merge: task t through the base encoder and t's module."""
    from pipeline.zoo.store import load_encoder_state

    base, modules = load(path)
    missing = [t for t in tasks if t not in modules]
    if missing:
        raise ValueError(f"{path} has no Surgery module for tasks {missing} (it has {sorted(modules)}); rerun "
                         "surgery with them")
    encoder.load_state_dict(load_encoder_state(base))
    device = next(encoder.parameters()).device
    for task in tasks:
        yield SurgeryEncoder(encoder, modules[task]["down"].to(device), modules[task]["up"].to(device)).eval()
