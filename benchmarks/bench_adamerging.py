"""Step time of layer-wise AdaMerging: our fused flat-vector step against a naive state-dict
rebuild and FusionBench's ``LayerWiseMergedModel`` (when ``fusion_bench`` is importable).

For each model it times, on one fixed batch, rounds in which each method in turn runs one
untimed step (which pays for the switch from the previous method's memory state) and then
``--timed-steps`` consecutive timed steps, as a training loop runs them (medians over rounds):

* floor: one forward + backward of the encoder with fixed weights (weight gradients on,
  released at the end of the step), the same entropy loss: what any AdaMerging step must at
  least cost;
* fed_floor: the same with the encoder's own weights fed as new tensors through
  ``functional_call`` each step (no merge): what feeding computed weights alone adds;
* ours: ``FusedMerge`` (``kernels.weighted_sum_segments``: Triton's flat output on CUDA, one
  tensor per parameter on the CPU; ``functional_call`` on views of them) + the pipeline's
  (fused) Adam step;
* naive: the merged state dict rebuilt per step from pretrained + sum_k lambda * tau_k with
  ``torch.func.functional_call`` + Adam step;
* fusion_bench: ``merge_weights()`` then forward, as FusionBench's layer-wise AdaMerging does;

and prints each step's overhead over the floor (the median over rounds of the difference
within a round) and the ratios of the peers' overheads to ours, each with a 90% bootstrap
interval over rounds (how far the ratio moves on this machine's noise). Models: the
synthetic tiny ViT and an open_clip ViT-B-32 image encoder, K random task vectors. On CPU
by default.

With ``--e2e-steps N`` it then runs the pipeline's own ``adamerge()`` (layer-wise, N steps,
the official batches: two of 16 images per task) end to end on the device and prints its
wall time next to N floor steps and N steps of each peer (their median step time times N).

    python benchmarks/bench_adamerging.py [--configs tiny vit-b-32] [--rounds N] [--device cpu]   # CPU: tiny, vit-b-32
    python benchmarks/bench_adamerging.py --configs vit-b-32-official --device cuda --e2e-steps 500

FusionBench is benchmark-only; to include it without touching the project's venv:

    python -m venv /tmp/fb-venv
    .venv/bin/python -c "import site; print(site.getsitepackages()[0])" \
        > "$(/tmp/fb-venv/bin/python -c 'import site; print(site.getsitepackages()[0])')/main.pth"
    /tmp/fb-venv/bin/pip install --no-deps fusion-bench && /tmp/fb-venv/bin/pip install omegaconf hydra-core
    /tmp/fb-venv/bin/python benchmarks/bench_adamerging.py
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.functional import FlatLayout
from pipeline.merging.adamerging import (
    PRECISIONS,
    FusedMerge,
    Settings,
    adamerge,
    compute_precision,
    entropy_loss,
    lambda_optimizer,
)
from pipeline.models.clip import create_model

CONFIGS = {  # name: (arch, tasks, batch size, batches per task, default rounds)
    "tiny": ("synth-vit-tiny", 8, 16, 2, 40),  # steps of ~80 ms with ~3 ms of noise: many rounds
    "vit-b-32": ("ViT-B-32", 8, 1, 1, 4),
    "vit-b-32-official": ("ViT-B-32", 8, 16, 2, 10),  # AdaMerging's batches, for a GPU
}
CPU_CONFIGS = ["tiny", "vit-b-32"]
TIMED_STEPS = 4  # per method and round, after one untimed step: consecutive steps, as in a training loop
BOOTSTRAP = 2000  # resamples of the rounds for the ratios' intervals
CLASSES = 10


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Case:
    """One model's encoder, task vectors, heads and batch."""

    def __init__(self, name: str, device: torch.device, seed: int = 0):
        arch, self.k, bs, nb, _ = CONFIGS[name]
        torch.manual_seed(seed)
        self.encoder = create_model(arch).visual.eval().requires_grad_(False).to(device)
        self.pre = {k: v.detach() for k, v in self.encoder.state_dict().items()}
        self.layout = FlatLayout.of(self.pre)
        self.base = self.layout.flatten(self.pre)
        self.tvs = 0.01 * torch.randn(self.k, self.layout.numel, device=device)
        self.tau = [self.layout.unflatten(row) for row in self.tvs]  # views: no extra memory
        size = self.encoder.image_size[0]
        self.x = torch.randn(self.k * bs * nb, 3, size, size, device=device)
        self.sizes = [[bs] * nb for _ in range(self.k)]
        dim = self.encoder.output_dim
        self.heads = [20 * nn.functional.normalize(torch.randn(CLASSES, dim, device=device), dim=-1)
                      for _ in range(self.k)]
        self.device = device

    def loss(self, features: torch.Tensor) -> torch.Tensor:
        return entropy_loss(features, self.heads, self.sizes)


def floor_step(case: Case) -> Callable[[], None]:
    encoder = copy.deepcopy(case.encoder).requires_grad_(True)

    def step() -> None:
        case.loss(encoder(case.x)).backward()
        encoder.zero_grad(set_to_none=True)  # freed within the step, as every other method's are
    return step


def fed_floor_step(case: Case) -> Callable[[], None]:
    """The floor with the encoder's own weights fed each step as new tensors through
    ``functional_call``, as every method that computes its weights feeds them: no merge."""
    weights = {k: v.detach() for k, v in case.encoder.named_parameters()}

    def step() -> None:
        fed = {k: v.detach().requires_grad_() for k, v in weights.items()}
        case.loss(functional_call(case.encoder, fed, (case.x,))).backward()
    return step


def ours_step(case: Case) -> Callable[[], None]:
    model = FusedMerge(case.encoder, case.layout, case.base, case.tvs, True, 0.3, (0.0, 1.0))
    opt = lambda_optimizer(model, Settings())

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        case.loss(model(case.x)).backward()
        opt.step()
    return step


def naive_step(case: Case) -> Callable[[], None]:
    raw = torch.full((case.k, len(case.layout.names)), 0.3, device=case.device, requires_grad=True)
    opt = torch.optim.Adam([raw], lr=1e-3)

    def step() -> None:
        lam = raw.clamp(0, 1)
        params = {name: case.pre[name] + sum(lam[k, seg] * case.tau[k][name] for k in range(case.k))
                  for seg, name in enumerate(case.layout.names)}
        opt.zero_grad(set_to_none=True)
        case.loss(functional_call(case.encoder, params, (case.x,))).backward()
        opt.step()
    return step


def fusion_bench_step(case: Case) -> Callable[[], None]:
    from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel, get_layer_wise_weights

    finetuned = []
    for tau in case.tau:
        model = copy.deepcopy(case.encoder).requires_grad_(True)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(tau[name])
        finetuned.append(model)
    pretrained = copy.deepcopy(case.encoder).requires_grad_(True)
    n_params = len(list(pretrained.parameters()))
    merged = LayerWiseMergedModel(get_layer_wise_weights(case.k, n_params, 0.3).to(case.device),
                                  pretrained, finetuned, clamp_weights=True)
    opt = torch.optim.Adam([merged.merge_weight], lr=1e-3)

    def step() -> None:
        merged.merge_weights()
        opt.zero_grad(set_to_none=True)
        case.loss(merged(case.x)).backward()
        opt.step()
    return step


def fusion_bench_available() -> bool:
    try:
        import fusion_bench.models.wrappers.layer_wise_fusion  # noqa: F401
    except ImportError as err:
        print(f"fusion_bench not importable ({err}); not benchmarked (see this script's docstring)")
        return False
    return True


def end_to_end(case: Case, steps: int, precision: str, variant: str = "layer_wise") -> float:
    """Seconds of the pipeline's ``adamerge()`` for ``steps`` steps, images cached on the device."""
    bs, nb = case.sizes[0][0], len(case.sizes[0])
    images = list(case.x.split(bs * nb))
    settings = Settings(steps=steps, batch_size=bs, batches_per_task=nb, log_every=max(steps, 1),
                        precision=precision)
    _sync(case.device)
    start = time.perf_counter()
    result = adamerge(variant, case.encoder, case.tvs, case.heads, images, settings, device=case.device,
                      progress=False)
    _sync(case.device)
    seconds = time.perf_counter() - start
    print(f"  end to end: adamerge({variant!r}) {steps} steps in {seconds:.1f} s "
          f"(entropy {result.entropy[0]:.4f} -> {result.entropy[-1]:.4f})")
    return seconds


def bench(name: str, device: torch.device, rounds: int, timed_steps: int, with_fb: bool, precision: str,
          e2e_steps: int = 0) -> dict[str, float]:
    with compute_precision(precision, device):
        med, over = bench_steps(name, device, rounds, timed_steps, with_fb)
    result = med | {f"{k}_overhead": v for k, v in over.items() if k != "floor"}
    if e2e_steps:
        for key, t in med.items():
            print(f"  {e2e_steps} steps of {key} (median step x {e2e_steps}): {t * e2e_steps:.1f} s")
        result["end_to_end_s"] = end_to_end(Case(name, device), e2e_steps, precision)
    return result


def overhead_ratio_interval(peer: list[float], ours: list[float], seed: int = 0) -> tuple[float, float]:
    """5th and 95th percentiles of median(peer) / median(ours) over bootstrap resamples of
    the rounds (per-round overheads, resampled in pairs)."""
    rng = random.Random(seed)
    n = len(ours)
    ratios = []
    for _ in range(BOOTSTRAP):
        idx = rng.choices(range(n), k=n)
        mine = statistics.median(ours[i] for i in idx)
        if mine > 0:
            ratios.append(statistics.median(peer[i] for i in idx) / mine)
    if len(ratios) < BOOTSTRAP // 2:  # our overhead is within the noise in most resamples
        return float("nan"), float("nan")
    ratios.sort()
    return ratios[len(ratios) // 20], ratios[-(len(ratios) // 20) - 1]


def bench_steps(name: str, device: torch.device, rounds: int, timed_steps: int,
                with_fb: bool) -> tuple[dict[str, float], dict[str, float]]:
    """Per method, the median step time and the overhead over the floor (seconds)."""
    case = Case(name, device)
    steps = {"floor": floor_step(case), "fed_floor": fed_floor_step(case), "ours": ours_step(case),
             "naive": naive_step(case)}
    if with_fb:
        steps["fusion_bench"] = fusion_bench_step(case)
    times: dict[str, list[float]] = {k: [] for k in steps}
    keys = list(steps)
    for r in range(rounds):  # each round starts one method later: no method always follows the same one
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            fn = steps[key]
            fn()  # settles what the previous method left in the caches and the heap: not timed
            turn = []
            for _ in range(timed_steps):
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                turn.append(time.perf_counter() - start)
            times[key].append(statistics.median(turn))
    med = {k: statistics.median(v) for k, v in times.items()}
    # overhead: per round the method's step minus the floor's, so that the machine's drift
    # over the run (steps slow down or speed up by 10-20%) cancels; the median over rounds
    per_round = {k: [t - f for t, f in zip(v, times["floor"], strict=True)] for k, v in times.items()}
    over = {k: statistics.median(v) for k, v in per_round.items()}
    n_img = case.x.shape[0]
    print(f"\n{name}: N={case.layout.numel / 1e6:.2f}M params in {len(case.layout.names)} tensors, "
          f"K={case.k}, {n_img} images/step, {rounds} rounds of {timed_steps} timed steps on {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"  {'method':<13}{'step ms':>10}{'overhead ms':>13}{'step/floor':>12}")
    for key, t in med.items():
        cell = "" if key == "floor" else f"{1e3 * over[key]:13.1f}"
        print(f"  {key:<13}{1e3 * t:10.1f}{cell:>13}{t / med['floor']:12.3f}")
    for key in [k for k in med if k not in ("floor", "fed_floor", "ours")]:
        if over["ours"] > 0:
            low, high = overhead_ratio_interval(per_round[key], per_round["ours"])
            ratio = f"{over[key] / over['ours']:.2f}x (90% bootstrap interval {low:.2f}x-{high:.2f}x)"
        else:
            ratio = "n/a (our overhead is within noise)"
        print(f"  overhead {key} / ours: {ratio}; step {key} / ours: {med[key] / med['ours']:.2f}x")
    return med, over


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=CPU_CONFIGS, choices=list(CONFIGS))
    p.add_argument("--rounds", type=int, help="rounds per method (default: per config, 4 to 40)")
    p.add_argument("--timed-steps", type=int, default=TIMED_STEPS,
                   help="consecutive timed steps per method and round, after one untimed step")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--e2e-steps", type=int, default=0,
                   help="then run the pipeline's adamerge() for this many steps end to end")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="encoder compute: fp32, TF32 matmuls, bf16 autocast (every method alike)")
    p.add_argument("--json", type=Path, help="write the medians (seconds) as JSON here")
    a = p.parse_args()
    if a.timed_steps < 1 or (a.rounds is not None and a.rounds < 1):
        p.error("--rounds and --timed-steps need at least 1")
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, precision {a.precision}")
    with_fb = fusion_bench_available()
    results = {name: bench(name, device, a.rounds or CONFIGS[name][-1], a.timed_steps, with_fb, a.precision,
                           a.e2e_steps)
               for name in a.configs}
    if a.json:
        a.json.write_text(json.dumps({"device": str(device), "precision": a.precision,
                                      "e2e_steps": a.e2e_steps, "results": results}, indent=1))


if __name__ == "__main__":
    main()
