"""Step time of Representation Surgery and WEMoE: the pipeline's implementations against
FusionBench's (``fusion_bench.models.surgery.SurgeryModelWrapper``, ``fusion_bench.models.we_moe.
WeightEnsemblingMoE`` built as its ``CLIPWeightEnsemblingMoEAlgorithm`` does) on the same model:
a random Hugging Face ``CLIPVisionModel`` of the given shape with K perturbed copies, its
weights mapped into the pipeline's open_clip encoder (``pipeline.models.hf_clip``).

Per model it prints medians over ``--rounds`` of ``--timed-steps`` consecutive steps (after one
untimed step) and the ratio FusionBench / ours, all measured in this run:

* surgery: one step over all K tasks (FusionBench: per task the fine-tuned and the merged
  model's features of a fresh batch, the module, L1, backward, Adam; ours: the same on the
  features cached once), plus ours' one-time cost of caching a batch of features (merged and
  own encoder), so the break-even number of steps is printed too;
* wemoe: one training step, batch_reduce (FusionBench's config): per task its batch, entropy,
  backward (FusionBench accumulates over tasks), one Adam step; ours: all tasks' batches at once;
* wemoe-eval: a no-grad forward of one batch with per-sample routing (FusionBench rebuilds
  the MLP weights per sample; ours routes without building any).

    /tmp/fb-venv/bin/python benchmarks/bench_test_time.py [--configs tiny vit-b-32] [--device cpu]
    python benchmarks/bench_test_time.py --configs vit-b-32 --batch 16 --device cuda --e2e-steps 1000

With ``--e2e-steps N`` it also runs the pipeline's ``wemoe()`` end to end (N steps) and prints
its wall time next to N FusionBench steps (their median step time times N).
"""
from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.merging import surgery as sg
from pipeline.merging import wemoe as wm
from pipeline.merging.adamerging import compute_precision, entropy_loss
from pipeline.models.hf_clip import hf_vision_to_open_clip, open_clip_config_from_hf

CONFIGS = {  # name: HF CLIPVisionConfig overrides (None: ViT-B/32's defaults)
    "tiny": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 2,
             "image_size": 32, "patch_size": 8, "projection_dim": 64},
    "vit-b-32": {},
}
CLASSES = 10


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Case:
    """One HF vision model, K perturbed copies, the same weights as open_clip encoders, heads, batches."""

    def __init__(self, name: str, k: int, batch: int, device: torch.device, seed: int = 0):
        from open_clip.model import _build_vision_tower
        from transformers import CLIPVisionConfig, CLIPVisionModel

        torch.manual_seed(seed)
        self.config = CLIPVisionConfig(**CONFIGS[name])
        self.hf = CLIPVisionModel(self.config).eval().requires_grad_(False)
        self.projection = nn.Linear(self.config.hidden_size, self.config.projection_dim, bias=False).requires_grad_(False)
        self.hf_experts = []
        for _ in range(k):
            m = copy.deepcopy(self.hf)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.01 * p.std().nan_to_num(1.0) * torch.randn_like(p))
            self.hf_experts.append(m)
        oc = open_clip_config_from_hf(self.config)
        self.encoder = _build_vision_tower(oc["embed_dim"], oc["vision_cfg"], quick_gelu=oc["quick_gelu"]).eval()
        proj = self.projection.weight.t()
        self.pre = hf_vision_to_open_clip(self.hf.state_dict(), projection=proj)
        self.finetuned = [hf_vision_to_open_clip(m.state_dict(), projection=proj) for m in self.hf_experts]
        self.encoder.load_state_dict(self.pre)
        self.encoder.to(device)
        self.k, self.batch, self.device = k, batch, device
        size = self.config.image_size
        self.x = [torch.randn(batch, 3, size, size, device=device) for _ in range(k)]
        self.heads = [20 * F.normalize(torch.randn(CLASSES, self.config.projection_dim, device=device), dim=-1)
                      for _ in range(k)]
        for m in [self.hf, self.projection, *self.hf_experts]:
            m.to(device)

    def hf_features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """FusionBench's CLIPClassificationMixin.compute_features: pooled output, projection, normalised."""
        z = self.projection(model(x)[1])
        return z / z.norm(p=2, dim=-1, keepdim=True)


# ---- Surgery ---------------------------------------------------------------------------------

def fb_surgery_step(case: Case) -> Callable[[], None]:
    from transformers.models.clip import modeling_clip

    if not hasattr(modeling_clip, "CLIPVisionTransformer"):  # transformers 5 dropped the name FusionBench imports
        modeling_clip.CLIPVisionTransformer = modeling_clip.CLIPVisionModel  # (for a type hint only)
    from fusion_bench.models.surgery.surgerymodelwrapper import SurgeryModelWrapper

    names = [str(k) for k in range(case.k)]
    merged = copy.deepcopy(case.hf)  # the base merge (its weights do not change the cost)
    alpha = SurgeryModelWrapper(merged, names, projection_dim=case.config.projection_dim).to(case.device)
    opt = torch.optim.Adam(alpha.collect_trainable_params(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)

    def step() -> None:
        for k, name in enumerate(names):
            target = case.hf_features(case.hf_experts[k], case.x[k])
            features, _, _ = alpha.compute_surgery_features(lambda m, k=k: case.hf_features(m, case.x[k]), name)
            loss = F.l1_loss(features, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return step


def ours_surgery_step(case: Case) -> Callable[[], None]:
    with torch.no_grad():
        z = case.encoder(torch.cat(case.x)).split(case.batch)
    settings = sg.Settings(steps=1, batch_size=case.batch)

    def step() -> None:  # one step of sg.train on the cached features (its setup included)
        sg.train(list(z), list(z), settings, progress=False)
    return step


def ours_surgery_cache(case: Case) -> Callable[[], None]:
    """The one-time cost per batch: the merged and the own encoder's features of K batches."""
    def cache() -> None:
        for x in case.x:
            sg.encode(case.encoder, x, len(x), case.device, "", progress=False)
            sg.encode(case.encoder, x, len(x), case.device, "", progress=False)
    return cache


# ---- WEMoE -----------------------------------------------------------------------------------

def fb_wemoe_model(case: Case, batch_reduce: bool) -> nn.Module:
    """FusionBench's CLIPWeightEnsemblingMoEAlgorithm.construct_moe_model on the case's models."""
    from fusion_bench.models.we_moe import WeightEnsemblingMoE

    base = copy.deepcopy(case.hf).requires_grad_(True)  # as FusionBench's model pool loads them
    experts = [copy.deepcopy(m).requires_grad_(True) for m in case.hf_experts]
    # Task Arithmetic of the rest (untimed set-up; fusion_bench 0.2.33's task_arithmetic_merge
    # refuses these models' mix of Parameters and Tensors in its state-dict arithmetic)
    moe = copy.deepcopy(base).requires_grad_(False)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            p += 0.3 * sum(dict(e.named_parameters())[name] - p for e in experts)
    def layers(m: nn.Module) -> nn.ModuleList:  # transformers 4: m.vision_model.encoder, 5: m.encoder
        return getattr(m, "vision_model", m).encoder.layers

    for i, layer in enumerate(layers(moe)):
        layer.mlp = WeightEnsemblingMoE(
            hidden_size=case.config.hidden_size, base_model=copy.deepcopy(layers(base)[i].mlp),
            expert_models=[copy.deepcopy(layers(e)[i].mlp) for e in experts], init_lambda=0.3,
            batch_first=True, router_hidden_layers=2, batch_reduce=batch_reduce)
    return moe.to(case.device)


def fb_wemoe_step(case: Case) -> Callable[[], None]:
    moe = fb_wemoe_model(case, batch_reduce=True).train()
    opt = torch.optim.Adam([p for p in moe.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        for k in range(case.k):  # use_grad_accumulate: one backward per task
            logits = case.hf_features(moe, case.x[k]) @ case.heads[k].t()
            probs = logits.softmax(-1)
            loss = -(probs * torch.log(probs + 1e-8)).sum(-1).mean()
            loss.backward(retain_graph=True)
        opt.step()
        opt.zero_grad()
    return step


def ours_wemoe_step(case: Case) -> Callable[[], None]:
    model = wm.build(case.encoder, case.pre, case.finetuned, wm.Settings(), case.device)
    opt = torch.optim.Adam(model.router_parameters(), lr=1e-4, fused=case.device.type in ("cpu", "cuda"))
    x, sizes = torch.cat(case.x), [[case.batch]] * case.k

    def step() -> None:
        loss = entropy_loss(model(x, [case.batch] * case.k), case.heads, sizes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def fb_wemoe_eval(case: Case) -> Callable[[], None]:
    moe = fb_wemoe_model(case, batch_reduce=False).eval()

    def forward() -> None:
        with torch.no_grad():
            case.hf_features(moe, case.x[0])
    return forward


def ours_wemoe_eval(case: Case) -> Callable[[], None]:
    model = wm.build(case.encoder, case.pre, case.finetuned, wm.Settings(), case.device)

    def forward() -> None:
        with torch.no_grad():
            model(case.x[0])
    return forward


def timed(fn: Callable[[], None], device: torch.device, rounds: int, steps: int) -> float:
    """Median over rounds of the mean seconds of ``steps`` consecutive calls (one untimed first)."""
    out = []
    for _ in range(rounds):
        fn()
        _sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        out.append((time.perf_counter() - t) / steps)
    return statistics.median(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--batch", type=int, default=0, help="images per task and step (0: 16 tiny, 2 vit-b-32 on "
                        "CPU, 16 on CUDA; the official batch is 16)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timed-steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    parser.add_argument("--e2e-steps", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, precision {args.precision}")
    for name in args.configs:
        batch = args.batch or (16 if name == "tiny" or device.type == "cuda" else 2)
        case = Case(name, args.tasks, batch, device)
        print(f"\n{name}: {args.tasks} tasks, {batch} images per task and step, "
              f"{sum(p.numel() for p in case.encoder.parameters()) / 1e6:.1f}M parameters per encoder")
        run = functools.partial(timed, device=device, rounds=args.rounds, steps=args.timed_steps)
        with compute_precision(args.precision, device):
            rows = {
                "surgery step": (run(ours_surgery_step(case)), run(fb_surgery_step(case))),
                "wemoe step": (run(ours_wemoe_step(case)), run(fb_wemoe_step(case))),
                "wemoe per-sample forward": (run(ours_wemoe_eval(case)), run(fb_wemoe_eval(case))),
            }
            cache = run(ours_surgery_cache(case))
        for what, (ours, fb) in rows.items():
            print(f"  {what:26s} ours {ours * 1e3:10.1f} ms   FusionBench {fb * 1e3:10.1f} ms   ratio {fb / ours:7.1f}x")
        ours, fb = rows["surgery step"]
        print(f"  surgery feature cache      ours {cache * 1e3:10.1f} ms per batch per task set (once per image): "
              f"break-even after {cache / max(fb - ours, 1e-9):.2f} steps")
        if args.e2e_steps:
            x = [xi.cpu() for xi in case.x]
            _sync(device)
            t = time.perf_counter()
            wm.wemoe(case.encoder, case.pre, case.finetuned, case.heads, x,
                     wm.Settings(steps=args.e2e_steps, batch_size=batch, precision=args.precision), device=device,
                     progress=False)
            _sync(device)
            e2e = time.perf_counter() - t
            print(f"  wemoe() end to end, {args.e2e_steps} steps: {e2e:.1f} s (FusionBench: "
                  f"{rows['wemoe step'][1] * args.e2e_steps:.1f} s at its median step time)")
        del case


if __name__ == "__main__":
    main()
