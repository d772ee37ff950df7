"""AdaMerging (Yang et al., ICLR 2024): merging coefficients learned by entropy minimisation
on unlabeled test images.

    theta = theta_pre + sum_k clamp(lambda_k^l, 0, 1) tau_k^l

with one coefficient per task (task-wise) or per task and parameter tensor (layer-wise);
the ``_plus`` variants (AdaMerging++) replace each tau_k by its TIES part (trimmed, elected,
disjoint; the top-``ties_k``% counted over ``ties_count_over`` as in
:mod:`pipeline.merging.ties_merging`). Defaults follow the official code: lambda starts at
0.3, Adam (lr 1e-3, betas (0.9, 0.999)), 500 steps, each step two freshly shuffled batches of
16 images per task, loss = sum over tasks and batches of the mean Shannon entropy of the
softmax predictions through each task's frozen zero-shot head, one backward per step.

The merged weights come from one operation per step (``kernels.weighted_sum``: Triton's
flat vector on CUDA, one tensor per parameter on the CPU) and the encoder runs on views of
them (:mod:`pipeline.functional`); all tasks' batches go
through the encoder as one batch (a ViT treats samples independently), gradients reach the
raw coefficients only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from kernels import ties_merge, weighted_sum, weighted_sum_segments
from pipeline.functional import FlatLayout, functional_forward
from pipeline.merging.contract import Images, Inputs, MergedState
from pipeline.models.clip import COUNTS, logits, zeros_counted

StateDict = dict[str, torch.Tensor]

# variant -> (one coefficient per tensor, TIES parts instead of task vectors)
VARIANTS = {
    "task_wise": (False, False),
    "layer_wise": (True, False),
    "task_wise_plus": (False, True),
    "layer_wise_plus": (True, True),
}


PRECISIONS = ("fp32", "tf32", "bf16")
CHECK_EVERY = 10  # steps between checks that the loss is finite (each one host synchronisation)


@contextlib.contextmanager
def compute_precision(precision: str, device: torch.device):
    """Run the encoder in ``precision``: fp32, TF32 matmuls, or bf16 autocast; the merged
    weights, coefficients and optimizer stay fp32. Restores the matmul precision after."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)


@dataclass(frozen=True)
class Settings:
    """AdaMerging hyper-parameters (defaults: the official code)."""

    init: float = 0.3
    clamp: tuple[float, float] = (0.0, 1.0)
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    steps: int = 500
    batch_size: int = 16
    batches_per_task: int = 2
    ties_k: float = 20.0  # AdaMerging++: percentage of entries each task vector keeps
    # ... of the visual encoder's entries (FusionBench), or "official_encoder": of the official code's
    # whole ImageEncoder, zero text-side entries included (pipeline.merging.ties_merging)
    ties_count_over: str = "visual"
    log_every: int = 100  # coefficients are recorded every this many steps and at the end
    seed: int = 0
    precision: str = "fp32"  # encoder matmuls: fp32 (the paper), tf32 or bf16 (autocast)
    # a task with fewer test images than batch_size x batches_per_task: refused (False), or all
    # its images drawn each step, in fewer or smaller batches than the other tasks' (True)
    allow_small_test_sets: bool = False

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or self.batches_per_task < 1 or self.log_every < 1:
            raise ValueError(f"AdaMerging settings need steps >= 0 and batch_size, batches_per_task, "
                             f"log_every >= 1: {self}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"AdaMerging precision {self.precision!r} unknown; choose one of {PRECISIONS}")
        if not self.clamp[0] <= self.clamp[1]:
            raise ValueError(f"AdaMerging clamp bounds {self.clamp} must be (low, high) with low <= high")
        if self.ties_count_over not in COUNTS:
            raise ValueError(f"AdaMerging ties_count_over must be one of {COUNTS}, got {self.ties_count_over!r}")


@dataclass
class Result:
    """Outcome of one AdaMerging run. Step s of ``lambda_raw`` is after s optimizer updates;
    ``entropy[t]`` is the loss computed with the coefficients of step t."""

    variant: str
    layout: FlatLayout
    settings: Settings
    lambda_raw: dict[int, torch.Tensor]  # step -> (K, L) unconstrained coefficients (CPU)
    entropy: list[float]
    state_dict: StateDict

    @property
    def lambdas(self) -> torch.Tensor:
        """The final coefficients as used in the merge (clamped), (K, L)."""
        return self.lambda_raw[max(self.lambda_raw)].clamp(*self.settings.clamp)


class FusedMerge(nn.Module):
    """The encoder with weights base + sum_k clamp(lambda_raw[k, seg]) * tvs[k], computed in
    one operation over all tensors; a coefficient per task and tensor (layer-wise) or per
    task (task-wise, shared by all tensors)."""

    def __init__(self, encoder: nn.Module, layout: FlatLayout, base: torch.Tensor, tvs: torch.Tensor,
                 layer_wise: bool, init: float, clamp: tuple[float, float]):
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.layout = layout
        self.register_buffer("base", base)
        self.register_buffer("tvs", tvs)
        self.clamp = clamp
        n_coefficients = len(layout.names) if layer_wise else 1
        self.lambda_raw = nn.Parameter(torch.full((tvs.shape[0], n_coefficients), float(init), device=base.device))

    def coefficients(self) -> torch.Tensor:
        """(K, L) clamped coefficients, one column per layout tensor (task-wise: repeated)."""
        return self.lambda_raw.clamp(*self.clamp).expand(-1, len(self.layout.names))

    def merged(self) -> torch.Tensor:
        """(N,) merged weights, differentiable w.r.t. ``lambda_raw`` only."""
        return weighted_sum(self.base, self.tvs, self.coefficients(), self.layout.offsets)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        parts = weighted_sum_segments(self.base, self.tvs, self.coefficients(), self.layout.offsets)
        return functional_forward(self.encoder, self.layout, parts, (images,))


def lambda_optimizer(model: FusedMerge, settings: Settings) -> torch.optim.Adam:
    """Adam over the raw coefficients, fused (one kernel for the whole update) on CPU and
    CUDA: the default for-each Adam costs about 1 ms a step on the CPU for these few values."""
    fused = model.lambda_raw.device.type in ("cpu", "cuda") or None
    betas = tuple(float(b) for b in settings.betas)  # a config's [0, 0.999]: Adam refuses mixed int/float
    return torch.optim.Adam([model.lambda_raw], lr=settings.lr, betas=betas, fused=fused)


def task_vector_matrix(layout: FlatLayout, base: torch.Tensor, finetuned: Sequence[StateDict]) -> torch.Tensor:
    """(K, N) task vectors theta_k - theta_pre in ``layout`` order, on ``base``'s device."""
    tvs = base.new_empty((len(finetuned), layout.numel))
    for k, sd in enumerate(finetuned):
        tvs[k] = layout.flatten(sd)
        tvs[k] -= base
    return tvs


def ties_parts(tvs: torch.Tensor, k: float, extra: int = 0) -> torch.Tensor:
    """AdaMerging++ inputs: each task vector's trimmed (counted with ``extra`` zeros),
    sign-elected, disjoint TIES part."""
    return ties_merge(tvs, k=k, merge="sum", return_parts=True, extra=extra)[1]


def softmax_entropy(logit: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of the softmax of each row."""
    return -(logit.softmax(1) * logit.log_softmax(1)).sum(1)


def entropy_loss(features: torch.Tensor, heads: Sequence[torch.Tensor],
                 batch_sizes: Sequence[Sequence[int]]) -> torch.Tensor:
    """Sum over tasks and batches of the batch-mean prediction entropy; ``features`` holds
    task 0's batches, then task 1's, ... with ``batch_sizes[t]`` the sizes of task t's."""
    per_task = features.split([sum(sizes) for sizes in batch_sizes])
    loss = features.new_zeros(())
    for feats, head, sizes in zip(per_task, heads, batch_sizes, strict=True):
        for ent in softmax_entropy(logits(feats, head)).split(list(sizes)):
            loss = loss + ent.mean()
    return loss


def draw_batches(images: Sequence[Images], batch_size: int, n_batches: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, list[list[int]]]:
    """Per task the first ``n_batches`` batches of a fresh shuffle of its images (as a shuffled
    DataLoader would give), concatenated, and the batch sizes per task; only the drawn rows
    are read (``x[LongTensor]``)."""
    xs, sizes = [], []
    for x in images:
        take = min(len(x), batch_size * n_batches)
        xs.append(x[torch.randperm(len(x), generator=generator)[:take]])
        sizes.append([min(batch_size, take - s) for s in range(0, take, batch_size)])
    return torch.cat(xs), sizes


def check_test_sets(variant: str, images: Sequence[Images], tasks: Sequence[str], settings: Settings) -> None:
    """Refuse a task whose test images cannot fill ``batches_per_task`` batches of
    ``batch_size`` (its batches would silently shrink), unless ``allow_small_test_sets``."""
    if settings.allow_small_test_sets:
        return
    need = settings.batch_size * settings.batches_per_task
    for k, x in enumerate(images):
        if len(x) < need:
            name = repr(tasks[k]) if tasks else str(k)
            raise ValueError(
                f"AdaMerging {variant}: task {name} has {len(x)} unlabeled test images, fewer than batch_size "
                f"{settings.batch_size} x batches_per_task {settings.batches_per_task} = {need} drawn per step, so "
                "its batches would shrink to what there is. Lower batch_size or batches_per_task, give it more "
                "images (max_images), or set allow_small_test_sets: true to take all its images each step")


def check_finite_loss(variant: str, losses: Sequence[torch.Tensor], start: int, settings: Settings) -> None:
    """Stop a diverged run: refuse the first of ``losses[start:]`` that is NaN or Inf, naming
    the step, the variant and the setting to change."""
    finite = torch.isfinite(torch.stack(list(losses[start:])))
    if bool(finite.all()):
        return
    step = start + int((~finite).nonzero()[0, 0])
    precision = "" if settings.precision == "fp32" else f", or precision fp32 (not {settings.precision})"
    raise FloatingPointError(
        f"AdaMerging {variant}: the entropy loss is {float(losses[step])} at step {step} (lr {settings.lr:g}): the "
        f"optimisation diverged and its merge would not be finite. Lower lr (the paper's is 1e-3){precision}, "
        "or check the fine-tuned encoders, heads and images for NaN or Inf")


def adamerge(variant: str, encoder: nn.Module, finetuned: Sequence[StateDict] | torch.Tensor,
             heads: Sequence[torch.Tensor], images: Sequence[Images], settings: Settings = Settings(),
             device: torch.device | str | None = None, progress: bool = True, tasks: Sequence[str] = (),
             arch: str | None = None) -> Result:
    """Learn AdaMerging coefficients and return them with the entropy curve and merged weights.
    The loss is checked every CHECK_EVERY steps and at the end: a run whose loss or
    coefficients stop being finite is stopped (:func:`check_finite_loss`).

    Args:
        variant: one of ``VARIANTS``.
        encoder: the pretrained image encoder; it is moved to ``device``, frozen and set to
            eval mode, its weights are left as they are.
        finetuned: the fine-tuned encoders' state dicts, or their (K, N) task vectors in
            ``FlatLayout.of(encoder.state_dict())`` order.
        heads: per task the (classes, dim) zero-shot head.
        images: per task the unlabeled (normalised) test images: a tensor, or an object that
            reads the rows it is indexed with (:class:`~pipeline.merging.contract.Images`).
        device: where to compute (default: CUDA when available).
        tasks: the tasks' names, for messages (default: their indices).
        arch: the zoo's architecture (AdaMerging++ with ``ties_count_over`` official_encoder).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown AdaMerging variant {variant!r}; known: {sorted(VARIANTS)}")
    if not len(finetuned) == len(heads) == len(images) >= 1:
        raise ValueError(f"need as many heads ({len(heads)}) and image sets ({len(images)}) "
                         f"as fine-tuned models ({len(finetuned)}), at least one")
    if any(len(x) == 0 for x in images):
        raise ValueError("every task needs at least one unlabeled image")
    s = settings
    check_test_sets(variant, images, tasks, s)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    layer_wise, plus = VARIANTS[variant]
    pretrained = encoder.state_dict()
    layout = FlatLayout.of(pretrained)
    base = layout.flatten(pretrained).to(device)
    if torch.is_tensor(finetuned):
        if finetuned.shape != (len(heads), layout.numel):
            raise ValueError(f"task vectors of shape {tuple(finetuned.shape)}, expected ({len(heads)}, {layout.numel})")
        tvs = finetuned.to(device=device, dtype=torch.float32)
    else:
        tvs = task_vector_matrix(layout, base, finetuned)
    if plus:
        tvs = ties_parts(tvs, s.ties_k, zeros_counted(s.ties_count_over, arch))
    model = FusedMerge(encoder.to(device), layout, base, tvs, layer_wise, s.init, s.clamp)
    heads = [h.to(device=device, dtype=torch.float32) for h in heads]
    optimizer = lambda_optimizer(model, s)
    generator = torch.Generator().manual_seed(s.seed)
    history = {0: model.lambda_raw.detach().cpu().clone()}
    losses = []  # kept on the device: no host synchronisation per step
    checked = 0  # losses[:checked] are known to be finite
    bar = tqdm(range(s.steps), desc=f"adamerging {variant}", disable=not progress, mininterval=2)
    with compute_precision(s.precision, device):
        for step in bar:
            x, sizes = draw_batches(images, s.batch_size, s.batches_per_task, generator)
            loss = entropy_loss(model(x.to(device, non_blocking=True)), heads, sizes)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            done = step + 1
            if done % CHECK_EVERY == 0 or done == s.steps:
                check_finite_loss(variant, losses, checked, s)
                checked = done
            if done % s.log_every == 0 or done == s.steps:
                history[done] = model.lambda_raw.detach().cpu().clone()
            if progress and done % 10 == 0:
                bar.set_postfix(entropy=f"{losses[-1].item():.4f}", refresh=False)
    if bool(history[s.steps].isnan().any()):  # the last update, whose loss no step computed
        raise FloatingPointError(f"AdaMerging {variant}: the coefficients are NaN after step {s.steps} (lr {s.lr:g}): "
                                 "the optimisation diverged. Lower lr (the paper's is 1e-3)")
    entropy = torch.stack(losses).float().tolist() if losses else []
    with torch.no_grad():
        state_dict = layout.state_dict(model.merged(), pretrained)
    return Result(variant, layout, s, history, entropy, state_dict)


def lambda_table(result: Result, tasks: Sequence[str]) -> pd.DataFrame:
    """One row per logged step, task and segment: the coefficient used (clamped) and its raw
    value; layer-wise segments name their tensor and transformer block."""
    layout, rows = result.layout, []
    for step, raw in sorted(result.lambda_raw.items()):
        used = raw.clamp(*result.settings.clamp)
        layer_wise = raw.shape[1] == len(layout.names)
        for k, task in enumerate(tasks):
            for seg in range(raw.shape[1]):
                rows.append({
                    "variant": result.variant, "task": task, "segment": seg,
                    "tensor": layout.names[seg] if layer_wise else None,
                    "block": layout.block_index(seg) if layer_wise else None,
                    "step": step, "value": float(used[k, seg]), "raw": float(raw[k, seg]),
                })
    table = pd.DataFrame(rows)
    table["block"] = table["block"].astype("Int64")
    return table


def entropy_table(result: Result) -> pd.DataFrame:
    """The loss (summed batch-mean entropies) per step."""
    return pd.DataFrame({"variant": result.variant, "step": range(len(result.entropy)), "entropy": result.entropy})


def runner(variant: str):
    """The registry entry point of one AdaMerging variant: ``run(inputs, settings)`` learns the
    coefficients on ``inputs.test`` and returns the merged encoder with the run
    (``details["result"]``: coefficients and entropy curve)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown AdaMerging variant {variant!r}; known: {sorted(VARIANTS)}")

    def run(inputs: Inputs, settings: Settings = Settings()) -> MergedState:
        result = adamerge(variant, inputs.encoder, inputs.finetuned, inputs.heads, inputs.test, settings,
                          device=inputs.device, progress=inputs.progress, tasks=inputs.tasks, arch=inputs.arch)
        return MergedState(result.state_dict, {"result": result})

    run.__qualname__ = f"run_{variant}"
    return run
