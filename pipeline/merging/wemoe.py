"""Weight-Ensembling MoE (Tang et al., Merging Multi-Task Models via Weight-Ensembling Mixture
of Experts, ICML 2024): the MLP of each routed transformer block becomes a mixture over the
task vectors of that MLP, weighted per sample by a small router fed by the MLP's input,

    MLP_l(z) with weights theta_pre^l + sum_k r_k^l(z) tau_k^l,   r^l(z) = mean over tokens of R_l(z),

the rest of the encoder merged by Task Arithmetic (lambda = ``init_lambda``). The routers
are learned by entropy minimisation on unlabeled test images, as AdaMerging's coefficients.

No weight is built per sample: each routed linear layer computes
``W_0 z + b_0 + sum_k r_k (T_k z + t_k)`` as one matmul over K stacked task vectors. With
fewer inputs than outputs (``c_fc``) the input is expanded, ``[r_1 z, ..., r_K z] @ [T_1 ... T_K]^T``
(the tensor autograd keeps is (B, S, K * d_in)); else (``c_proj``) the K outputs ``T_k z`` come
from one matmul and are summed with the weights r (kept: (B, S, K * d_out)). So a routed MLP
costs K + 1 MLPs of compute and never more than K times the narrow side of its activations.
Training with ``batch_reduce`` (each task's batch routed by its mean weights) builds one
weight set per task's batch instead (:func:`grouped_linear`): K weighted sums of the task
vectors and one MLP per batch.

Saved as one safetensors file of the module's state dict: the encoder (routed blocks keep
their pretrained MLP weights as ``c_fc``/``c_proj``) plus per routed block ``mlp.router.*``
and the task vectors ``mlp.{c_fc,c_proj}_tau`` (c_fc: (d_out, K, d_in), c_proj: (K, d_out,
d_in)) and ``_tau_bias`` (K, d_out); :func:`route` rebuilds the module from the keys.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.merging.adamerging import (
    CHECK_EVERY,
    PRECISIONS,
    compute_precision,
    draw_batches,
    entropy_loss,
)
from pipeline.merging.contract import Images, Inputs, StateDict

_ROUTED = re.compile(r"^transformer\.resblocks\.(\d+)\.mlp\.router\.")
_LINEARS = ("c_fc", "c_proj")
ROUTING_IMAGES = 128  # test images per task whose routing weights the routing table averages


@dataclass(frozen=True)
class Settings:
    """WEMoE hyper-parameters. Defaults: FusionBench's method/wemoe/weight_ensembling_moe.yaml
    (the authors' implementation): ``init_lambda`` 0.3 (Task Arithmetic scale of the rest of
    the encoder and the routers' initial output), ``router_hidden_layers`` 2 (Linear(d, d),
    ReLU, Linear(d, K); 0: one constant weight per task and block), Adam ``lr`` 1e-4 (torch's
    default ``betas``), ``steps`` 1000, ``batch_size`` 16 images per task and step,
    ``batch_reduce`` true (training routes each task's batch by its mean routing weights;
    evaluation always routes per sample). ``upper_blocks``: how many of the last blocks are
    routed, 0 all (the paper's main model; its ablations route the upper ones). ``precision``
    as AdaMerging's (fp32: the paper)."""

    init_lambda: float = 0.3
    router_hidden_layers: int = 2
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    steps: int = 1000
    batch_size: int = 16
    batch_reduce: bool = True
    upper_blocks: int = 0
    precision: str = "fp32"
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or self.router_hidden_layers < 0 or self.upper_blocks < 0:
            raise ValueError(f"WEMoE settings need steps, router_hidden_layers, upper_blocks >= 0 and batch_size >= 1: "
                             f"{self}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"WEMoE precision {self.precision!r} unknown; choose one of {PRECISIONS}")


class Router(nn.Module):
    """Per-sample routing weights (B, K) from a block's MLP input (B, S, d): ``hidden_layers``
    - 1 Linear(d, d) + ReLU, then Linear(d, K), averaged over the tokens; no hidden layer: one
    learned constant per task. Initialised as FusionBench's gates: weights N(0, 0.01), hidden
    biases 0, output biases ``init`` (so it starts at Task Arithmetic with lambda ``init``)."""

    def __init__(self, width: int, n_tasks: int, hidden_layers: int, init: float):
        super().__init__()
        self.constant = nn.Parameter(torch.full((n_tasks,), float(init))) if hidden_layers == 0 else None
        layers: list[nn.Module] = []
        for _ in range(max(hidden_layers - 1, 0)):
            layers += [nn.Linear(width, width), nn.ReLU()]
        if hidden_layers:
            layers.append(nn.Linear(width, n_tasks))
        self.net = nn.Sequential(*layers)
        with torch.no_grad():
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, std=0.01)
                    nn.init.zeros_(layer.bias)
            if hidden_layers:
                self.net[-1].bias.fill_(init)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.constant is not None:
            return self.constant.expand(z.shape[0], -1)
        return self.net(z).mean(1)


def routed_linear(x: torch.Tensor, r: torch.Tensor, layer: nn.Linear, tau: torch.Tensor,
                  tau_bias: torch.Tensor) -> torch.Tensor:
    """``layer(x) + sum_k r[:, k] (x T_k^T + t_k)`` for x (B, S, i), r (B, K); ``tau`` is
    (o, K, i) when i <= o (the input is expanded), else (K, o, i) (the outputs are)."""
    out = layer(x) + (r.to(tau_bias.dtype) @ tau_bias).unsqueeze(1)
    k = r.shape[1]
    if layer.in_features <= layer.out_features:
        xr = (x.unsqueeze(2) * r[:, None, :, None].to(x.dtype)).flatten(2)  # (B, S, K * i)
        return out + F.linear(xr, tau.flatten(1))
    y = F.linear(x, tau.flatten(0, 1)).unflatten(-1, (k, -1))  # (B, S, K, o)
    return out + torch.einsum("bsko,bk->bso", y, r.to(y.dtype))


def grouped_linear(x: torch.Tensor, r: torch.Tensor, sizes: Sequence[int], layer: nn.Linear, tau: torch.Tensor,
                   tau_bias: torch.Tensor) -> torch.Tensor:
    """``routed_linear`` when the samples come in groups of ``sizes`` that share their routing
    weights r (G, K): each group's weights ``W_0 + sum_k r[g, k] T_k`` built once (one matmul
    over the task vectors for all groups), then one matmul per group."""
    if layer.in_features <= layer.out_features:  # tau (o, K, i)
        delta = torch.matmul(r.to(tau.dtype), tau).transpose(0, 1)  # (G, o, i)
    else:  # tau (K, o, i)
        delta = (r.to(tau.dtype) @ tau.flatten(1)).view(len(r), *tau.shape[1:])
    bias = layer.bias + r.to(tau_bias.dtype) @ tau_bias  # (G, o)
    return torch.cat([F.linear(xg, layer.weight + dg, bg) for xg, dg, bg in zip(x.split(list(sizes)), delta, bias)])


class RoutedMLP(nn.Module):
    """A transformer block's MLP (c_fc, activation, c_proj) with its pretrained weights as the
    base, the K task vectors of its two linear layers and a router."""

    def __init__(self, mlp: nn.Module, taus: Mapping[str, torch.Tensor], router: Router):
        super().__init__()
        self.c_fc, self.gelu, self.c_proj = mlp.c_fc, mlp.gelu, mlp.c_proj
        self.router = router
        for name in _LINEARS:
            w = taus[f"{name}.weight"]  # (K, o, i)
            expand_input = getattr(self, name).in_features <= getattr(self, name).out_features  # as routed_linear
            self.register_buffer(f"{name}_tau", w.permute(1, 0, 2).contiguous() if expand_input else w.contiguous())
            self.register_buffer(f"{name}_tau_bias", taus[f"{name}.bias"].contiguous())
        self.groups: Sequence[int] | None = None  # batch_reduce: sizes of the sample groups routed together
        self.routing: torch.Tensor | None = None  # the last (B, K) routing weights (detached)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        r = self.router(z)
        if self.groups is None:
            self.routing = r.detach()
            h = self.gelu(routed_linear(z, r, self.c_fc, self.c_fc_tau, self.c_fc_tau_bias))
            return routed_linear(h, r, self.c_proj, self.c_proj_tau, self.c_proj_tau_bias)
        sizes = list(self.groups)
        r = torch.stack([g.mean(0) for g in r.split(sizes)])  # (G, K)
        self.routing = r.detach().repeat_interleave(torch.tensor(sizes, device=r.device), 0)
        h = self.gelu(grouped_linear(z, r, sizes, self.c_fc, self.c_fc_tau, self.c_fc_tau_bias))
        return grouped_linear(h, r, sizes, self.c_proj, self.c_proj_tau, self.c_proj_tau_bias)


class WEMoE(nn.Module):
    """The encoder with routed MLPs; ``forward(images, groups)``: ``groups`` (sizes of
    consecutive sample groups, e.g. one per task's batch) routes each group by its mean weights."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.mlps = {int(i): b.mlp for i, b in enumerate(encoder.transformer.resblocks) if isinstance(b.mlp, RoutedMLP)}

    def forward(self, images: torch.Tensor, groups: Sequence[int] | None = None) -> torch.Tensor:
        for mlp in self.mlps.values():
            mlp.groups = groups
        try:
            return self.encoder(images)
        finally:
            for mlp in self.mlps.values():
                mlp.groups = None

    def router_parameters(self) -> list[nn.Parameter]:
        return [p for mlp in self.mlps.values() for p in mlp.router.parameters()]

    def routing(self) -> dict[int, torch.Tensor]:
        """Block -> the (B, K) routing weights of the last forward."""
        return {i: mlp.routing for i, mlp in self.mlps.items()}


def routed_blocks(n_blocks: int, upper: int) -> list[int]:
    """The blocks whose MLPs are routed: the last ``upper`` (0: all)."""
    if upper > n_blocks:
        raise ValueError(f"WEMoE upper_blocks {upper} exceeds the encoder's {n_blocks} transformer blocks")
    return list(range(n_blocks - upper if upper else 0, n_blocks))


def _blocks_of(encoder: nn.Module) -> nn.ModuleList:
    transformer = encoder.transformer
    if not getattr(transformer, "batch_first", True):
        raise ValueError("WEMoE routes (batch, tokens, width) activations: the encoder's transformer must be batch_first")
    return transformer.resblocks


def build(encoder: nn.Module, pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
          settings: Settings = Settings(), device: torch.device | str = "cpu", progress: bool = False) -> WEMoE:
    """The WEMoE model before adaptation, on ``device``: a copy of ``encoder`` with the Task
    Arithmetic merge (``init_lambda``) outside the routed MLPs, which keep the pretrained
    weights and get the task vectors and fresh routers. The fine-tuned models are read one at
    a time (``finetuned`` may load lazily)."""
    blocks = routed_blocks(len(_blocks_of(encoder)), settings.upper_blocks)
    k = len(finetuned)
    mlp_keys = {f"transformer.resblocks.{b}.mlp.{n}.{p}" for b in blocks for n in _LINEARS for p in ("weight", "bias")}
    floats = [key for key, v in pretrained.items() if v.is_floating_point()]
    merged = {key: pretrained[key].float().clone() for key in floats}
    taus = {key: torch.empty((k, *pretrained[key].shape)) for key in mlp_keys}
    for t, state in enumerate(tqdm(finetuned, desc="wemoe: task vectors", disable=not progress, mininterval=2)):
        for key in floats:
            tau = state[key].float() - pretrained[key].float()
            if key in mlp_keys:
                taus[key][t] = tau
            else:
                merged[key] += settings.init_lambda * tau
    model = copy.deepcopy(encoder).requires_grad_(False).eval()
    model.load_state_dict({key: merged[key].to(v.dtype) if key in merged else v for key, v in pretrained.items()})
    width = model.transformer.width
    for b in blocks:
        block = model.transformer.resblocks[b]
        prefix = f"transformer.resblocks.{b}.mlp."
        block.mlp = RoutedMLP(block.mlp, {key.removeprefix(prefix): v for key, v in taus.items() if key.startswith(prefix)},
                              Router(width, k, settings.router_hidden_layers, settings.init_lambda))
    return WEMoE(model).to(device)


def added_parameters(model: WEMoE) -> dict[str, int]:
    """What WEMoE adds to one encoder: the routers' parameters and the stored MLP task vectors."""
    routers = sum(p.numel() for p in model.router_parameters())
    experts = sum(getattr(m, f"{n}_tau{s}").numel() for m in model.mlps.values() for n in _LINEARS
                  for s in ("", "_bias"))
    return {"router_parameters": routers, "expert_parameters": experts}


@dataclass
class Result:
    """A trained WEMoE: the model, the loss per step, the mean routing weights per task of
    the images, block and expert after training."""

    model: WEMoE
    tasks: list[str]
    entropy: list[float]
    routing: pd.DataFrame

    def state_dict(self) -> StateDict:
        return {k: v.detach().cpu() for k, v in self.model.encoder.state_dict().items()}

    def save(self, path: str | Path) -> dict:
        from pipeline.models.checkpoints import save_state_dict

        save_state_dict(self.state_dict(), path)
        return {}


def routing_table(model: WEMoE, tasks: Sequence[str], images: Sequence[Images], generator: torch.Generator,
                  device: torch.device, n_images: int = ROUTING_IMAGES) -> pd.DataFrame:
    """Mean per-sample routing weight of each block and expert over ``n_images`` random test
    images of each task (rows: task of the images, block, expert, weight)."""
    rows = []
    with torch.no_grad():
        for task, x in zip(tasks, images, strict=True):
            batch, _ = draw_batches([x], n_images, 1, generator)
            model(batch.to(device))
            for block, r in model.routing().items():
                for k, w in enumerate(r.float().mean(0).tolist()):
                    rows.append({"task": task, "block": block, "expert": tasks[k], "weight": w})
    return pd.DataFrame(rows)


def wemoe(encoder: nn.Module, pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
          heads: Sequence[torch.Tensor], images: Sequence[Images], settings: Settings = Settings(),
          device: torch.device | str | None = None, progress: bool = True, tasks: Sequence[str] = ()) -> Result:
    """Build the WEMoE model and learn its routers: each step a fresh batch of ``batch_size``
    images per task, all tasks' batches through the model at once, loss the sum over tasks of
    the batch-mean prediction entropy through each task's head, one Adam step."""
    if not len(finetuned) == len(heads) == len(images) >= 1:
        raise ValueError(f"WEMoE needs as many heads ({len(heads)}) and image sets ({len(images)}) "
                         f"as fine-tuned models ({len(finetuned)}), at least one")
    tasks = list(tasks) or [str(k) for k in range(len(heads))]
    s = settings
    for task, x in zip(tasks, images):
        if len(x) < s.batch_size:
            raise ValueError(f"WEMoE: task {task!r} has {len(x)} unlabeled test images, fewer than batch_size "
                             f"{s.batch_size}; lower batch_size or give it more images (max_images)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build(encoder, pretrained, finetuned, s, device, progress)
    heads = [h.to(device=device, dtype=torch.float32) for h in heads]
    params = model.router_parameters()
    fused = device.type in ("cpu", "cuda") or None
    optimizer = torch.optim.Adam(params, lr=s.lr, betas=tuple(float(b) for b in s.betas), fused=fused)
    generator = torch.Generator().manual_seed(s.seed)
    losses = []
    bar = tqdm(range(s.steps), desc="wemoe", disable=not progress, mininterval=2)
    with compute_precision(s.precision, device):
        for step in bar:
            x, sizes = draw_batches(images, s.batch_size, 1, generator)
            groups = [sum(g) for g in sizes] if s.batch_reduce else None
            loss = entropy_loss(model(x.to(device, non_blocking=True), groups).float(), heads, sizes)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            checked = (step + 1) % CHECK_EVERY == 0 or step + 1 == s.steps
            if checked and not bool(torch.isfinite(torch.stack(losses[-CHECK_EVERY:])).all()):
                raise FloatingPointError(f"WEMoE: the entropy loss is not finite by step {step + 1} (lr {s.lr:g}): "
                                         "the optimisation diverged. Lower lr (the paper's is 1e-4) or use precision "
                                         "fp32")
            if progress and (step + 1) % 10 == 0:
                bar.set_postfix(entropy=f"{losses[-1].item():.4f}", refresh=False)
        routing = routing_table(model.eval(), tasks, images, generator, device)
    model.requires_grad_(False)
    entropy = torch.stack(losses).float().tolist() if losses else []
    return Result(model, tasks, entropy, routing)


def load(path: str | Path, encoder: nn.Module) -> WEMoE:
    """A saved WEMoE model on ``encoder``'s device: a copy of ``encoder`` with routed MLPs as
    the file's keys say (blocks, tasks, router depth), the file's weights loaded."""
    from pipeline.models.checkpoints import load_safetensors

    state = load_safetensors(path)
    device = next(encoder.parameters()).device
    model = copy.deepcopy(encoder).requires_grad_(False).eval()
    blocks = sorted({int(m.group(1)) for key in state if (m := _ROUTED.match(key))})
    if not blocks:
        raise ValueError(f"{path} holds no routed MLP (no transformer.resblocks.*.mlp.router.* keys): it is no WEMoE "
                         "merge; evaluate it as a plain encoder")
    for b in blocks:
        prefix = f"transformer.resblocks.{b}.mlp."
        k = state[f"{prefix}c_fc_tau_bias"].shape[0]
        depth = sum(1 for key in state if key.startswith(f"{prefix}router.net.") and key.endswith(".weight"))
        mlp = model.transformer.resblocks[b].mlp
        taus = {f"{n}.{p}": torch.zeros(k, *getattr(mlp, n).weight.shape[: 1 if p == "bias" else 2])
                for n in _LINEARS for p in ("weight", "bias")}
        model.transformer.resblocks[b].mlp = RoutedMLP(mlp, taus, Router(model.transformer.width, k, depth, 0.0))
    model.load_state_dict(state)
    return WEMoE(model).to(device)


def route(path: str | Path, encoder: nn.Module, tasks: Sequence[str]) -> Iterator[nn.Module]:
    """Evaluation of a saved WEMoE merge: the same routed model for every task (routing per sample)."""
    model = load(path, encoder)
    for _ in tasks:
        yield model


def run(inputs: Inputs, settings: Settings = Settings()) -> Result:
    """The registry entry point: WEMoE on ``inputs.test`` with the fine-tuned models and heads."""
    return wemoe(inputs.encoder, inputs.pretrained, inputs.finetuned, inputs.heads, inputs.test, settings,
                 device=inputs.device, progress=inputs.progress, tasks=inputs.tasks)
