"""Our RegMean++ and Fisher estimators against FusionBench 0.2.33's on the same random-weight
CLIP image encoders and the same images: max abs difference of the merged weights (and of the
Fisher tensors), wall time and peak RSS of each implementation.

The zoo: a random ``transformers.CLIPVisionModel`` of a small config (the pretrained one),
K fine-tuned copies (pretrained + Gaussian noise), a frozen random visual projection (as
FusionBench's CLIP zoos have), per task N random images and a random zero-shot head. Our side
maps the HF weights to open_clip with the project's own key mapping
(``pipeline.models.hf_clip.hf_vision_to_open_clip``); FusionBench's runs its
``RegMeanAlgorithmForCLIPPlusPlus.run`` and ``FisherMergingForCLIPVisionModel.run`` on the HF
modules (their zero-shot-head setup replaced by the same heads, their image processor by the
identity: the images are tensors already). Each implementation runs in a fresh process: its
time is the merge's alone, its RSS the process's peak (``ru_maxrss``) with the rise the merge
caused over the peak before it.

Known differences, printed beside the numbers: FusionBench's RegMean++ leaves ``post_layernorm``
(open_clip ``ln_post``) pretrained, ours averages it (as RegMean does); our Fisher has the
projection's entries too (open_clip's ``proj`` is a parameter of the encoder), which enter the
unit-norm scaling. With transformers 5 an encoder layer returns a tensor, and FusionBench's
RegMean++ takes ``layer(...)[0]`` (the first example, where transformers 4 returned a tuple)
and reads ``model.vision_model``, which a transformers 5 ``CLIPVisionModel`` no longer has: its
run here gets transformers 4's tuple and layout back. Its ``RegMeanAlgorithmForCLIPPlusPlus``
cannot be built as shipped (its ``_config_mapping`` is a plain dict, which the mixin's
``__init__`` reads as a bidict); a subclass gives it RegMean++'s mapping plus its own key.

    /tmp/fb-venv/bin/python benchmarks/bench_successors_regmean.py [--config tiny|small]

(/tmp/fb-venv: fusion-bench 0.2.33 with the project's dependencies; see bench_adamerging.py.)
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {  # width, layers, heads, image size, patch, tasks, images per task, classes
    "tiny": {"width": 32, "layers": 2, "heads": 2, "image": 32, "patch": 8, "tasks": 3, "examples": 64, "classes": 5},
    "small": {"width": 192, "layers": 4, "heads": 4, "image": 64, "patch": 16, "tasks": 4, "examples": 64,
              "classes": 10},
}
ALPHA, SEED = 0.95, 0
FISHER_ESTIMATORS = ("exact", "sampled", "fusionbench")
IMPLEMENTATIONS = ("ours_regmean_plusplus", "fusionbench_regmean_plusplus", "ours_regmean",
                   *(f"ours_fisher_{e}" for e in FISHER_ESTIMATORS), "fusionbench_fisher")


def zoo(cfg: dict):
    """(HF config, pretrained HF model, fine-tuned HF models, projection (nn.Linear), per task
    images, per task unit-norm text embeddings), the same in every process."""
    import transformers

    config = transformers.CLIPVisionConfig(
        hidden_size=cfg["width"], intermediate_size=4 * cfg["width"], num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"], image_size=cfg["image"], patch_size=cfg["patch"], projection_dim=16,
        hidden_act="quick_gelu")
    torch.manual_seed(SEED)
    pretrained = transformers.CLIPVisionModel(config).eval()
    projection = nn.Linear(cfg["width"], 16, bias=False).requires_grad_(False)
    finetuned = []
    for k in range(cfg["tasks"]):
        g = torch.Generator().manual_seed(100 + k)
        model = transformers.CLIPVisionModel(config).eval()
        model.load_state_dict({n: v + 0.02 * torch.randn(v.shape, generator=g)
                               for n, v in pretrained.state_dict().items()})
        finetuned.append(model)
    g = torch.Generator().manual_seed(200)
    images = [torch.randn(cfg["examples"], 3, cfg["image"], cfg["image"], generator=g) for _ in finetuned]
    texts = [nn.functional.normalize(torch.randn(cfg["classes"], 16, generator=g), dim=-1) for _ in finetuned]
    return config, pretrained, finetuned, projection, images, texts


def to_open_clip(hf_state: dict, config, projection: nn.Linear) -> dict:
    from pipeline.models.hf_clip import hf_vision_to_open_clip

    return hf_vision_to_open_clip(hf_state, config, projection=projection.weight.t())


def ours(name: str, cfg: dict):
    """A function running our merge: -> (merged open_clip state, per-task Fishers (Fisher runs))."""
    from open_clip.model import _build_vision_tower

    from pipeline.merging import fisher_merging, registry
    from pipeline.merging.contract import Inputs
    from pipeline.models.hf_clip import open_clip_config_from_hf

    config, _, finetuned, projection, images, texts = zoo(cfg)
    encoder = _build_vision_tower(**open_clip_config_from_hf(config)).eval()
    states = [to_open_clip(m.state_dict(), config, projection) for m in finetuned]
    n = cfg["examples"]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SEED))
    # our seeded order then visits FusionBench's sequential order: position order[i] holds image i
    train = []
    for x in images:
        arranged = torch.empty_like(x)
        arranged[order] = x
        train.append(TensorDataset(arranged, torch.zeros(n)))
    heads = [100.0 * t for t in texts]  # FusionBench: logit_scale_exp (100) * text @ image^T
    method = name.removeprefix("ours_")
    estimator = method.removeprefix("fisher_") if method.startswith("fisher_") else None
    spec = registry.method("fisher_merging" if estimator else method)
    settings = spec.configure({"examples": n} | ({"estimator": estimator} if estimator else {"alpha": ALPHA}))
    fishers = {}
    if estimator:
        original = fisher_merging.diagonal_fisher

        def recorded(*args, desc, **kwargs):
            fishers[desc] = original(*args, desc=desc, **kwargs)
            return fishers[desc]

        fisher_merging.diagonal_fisher = recorded
    inputs = Inputs({}, [f"task{k}" for k in range(len(states))], encoder=encoder, finetuned=states, heads=heads,
                    train=train, seed=SEED, progress=False)
    return lambda: (spec.run(inputs, settings).state_dict(), fishers)


class _Transformers4Layout(nn.Module):
    """A transformers 5 ``CLIPVisionModel`` (the tower itself) behind ``vision_model``, as
    transformers 4 held it and FusionBench 0.2.33's RegMean++ reads it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision_model = model

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, *args, **kwargs):
        return self.vision_model(*args, **kwargs)


def fusionbench(name: str, cfg: dict):
    """A function running FusionBench's merge: -> (merged open_clip state, per-task Fishers)."""
    from fusion_bench.modelpool import BaseModelPool
    from omegaconf import DictConfig

    config, pretrained, finetuned, projection, images, texts = zoo(cfg)
    n = cfg["examples"]
    datasets = {f"task{k}": TensorDataset(x, torch.zeros(n, dtype=torch.long)) for k, x in enumerate(images)}

    class Pool(BaseModelPool):
        def load_train_dataset(self, dataset_name, *args, **kwargs):
            return datasets[dataset_name]

    models = [pretrained, *finetuned]
    if name == "fusionbench_regmean_plusplus":
        models = [_Transformers4Layout(m) for m in models]
    pool = Pool({"_pretrained_": models[0], **{f"task{k}": m for k, m in enumerate(models[1:])}})
    loader = DictConfig({"batch_size": 32, "num_workers": 0})
    fishers = {}
    if name == "fusionbench_regmean_plusplus":
        import transformers.models.clip.modeling_clip as clip
        from fusion_bench.method.regmean_plusplus.clip_regmean_plusplus import RegMeanAlgorithmForCLIPPlusPlus
        from fusion_bench.method.regmean_plusplus.regmean_plusplus import RegMeanAlgorithmPlusPlus

        forward = clip.CLIPEncoderLayer.forward
        clip.CLIPEncoderLayer.forward = lambda self, *a, **kw: (forward(self, *a, **kw),)  # transformers 4's tuple
        class Algorithm(RegMeanAlgorithmForCLIPPlusPlus):  # 0.2.33's own is a dict, which __init__ cannot read
            _config_mapping = RegMeanAlgorithmPlusPlus._config_mapping | {"_dataloader_kwargs": "dataloader_kwargs"}

        algorithm = Algorithm(
            exclude_param_names_regex=[], num_regmean_examples=n, reduce_non_diagonal_ratio=ALPHA,
            weight_transpose=True, dataloader_kwargs=loader)
        algorithm.on_regmean_start = lambda: None  # RegMean++ reads no heads
    else:
        from fusion_bench.method.fisher_merging.clip_fisher_merging import FisherMergingForCLIPVisionModel

        algorithm = FisherMergingForCLIPVisionModel(
            exclude_param_names_regex=[], normalize_fisher_weight=True, minimal_fisher_weight=1e-6,
            num_fisher_examples=n, dataloader_kwargs=loader)
        algorithm.on_fisher_merging_start = lambda: None  # the heads are set here instead
        algorithm.zeroshot_weights = {f"task{k}": t for k, t in enumerate(texts)}
        algorithm.visual_projection = projection
        algorithm.logit_scale_exp = torch.tensor(100.0)
        original = algorithm.get_fisher_weights

        def recorded(model_name, *args, **kwargs):
            fishers[model_name] = original(model_name, *args, **kwargs)
            return fishers[model_name]

        algorithm.get_fisher_weights = recorded
    algorithm._clip_processor = lambda image: image

    def run():
        merged = algorithm.run(pool)
        mapped = {k: to_open_clip({key: v.detach() for key, v in f.items()}, config, projection)  # its proj: none
                  for k, f in fishers.items()}
        return to_open_clip(merged.state_dict(), config, projection), mapped

    return run


def worker(name: str, cfg: dict, out: str) -> None:
    torch.set_num_threads(1)
    run = (fusionbench if name.startswith("fusionbench") else ours)(name, cfg)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    merged, fishers = run()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save({"merged": merged, "fishers": fishers}, out)
    print(json.dumps({"seconds": seconds, "rss_mib": peak / 1024, "rise_mib": (peak - before) / 1024}))


def max_abs(a: dict, b: dict, keys) -> tuple[float, str]:
    diffs = {k: float((a[k].double() - b[k].double()).abs().max()) for k in keys}
    worst = max(diffs, key=diffs.get)
    return diffs[worst], worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--worker", choices=IMPLEMENTATIONS)
    parser.add_argument("--out")
    args = parser.parse_args()
    cfg = CONFIGS[args.config]
    if args.worker:
        return worker(args.worker, cfg, args.out)
    print(f"config {args.config}: {cfg}, alpha {ALPHA}, CPU, one thread")
    runs, results = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in IMPLEMENTATIONS:
            out = f"{tmp}/{name}.pt"
            proc = subprocess.run([sys.executable, __file__, "--config", args.config, "--worker", name, "--out", out],
                                  check=False, capture_output=True, text=True)
            if proc.returncode:
                print(f"{name}: failed\n{proc.stderr[-3000:]}")
                continue
            runs[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            results[name] = torch.load(out)
    print(f"\n{'implementation':32s} {'seconds':>9s} {'peak RSS MiB':>13s} {'rise MiB':>9s}")
    for name, r in runs.items():
        print(f"{name:32s} {r['seconds']:9.3f} {r['rss_mib']:13.1f} {r['rise_mib']:9.1f}")

    def compare(a: str, b: str, what: str) -> None:
        if a not in results or b not in results:
            return
        x, y = results[a]["merged"], results[b]["merged"]
        keys = sorted(set(x) & set(y))
        others = [k for k in keys if not k.startswith("ln_post")]
        diff, worst = max_abs(x, y, others)
        post, _ = max_abs(x, y, [k for k in keys if k.startswith("ln_post")])
        scale = max(float(x[k].abs().max()) for k in others)
        print(f"{what}: max |ours - FusionBench| {diff:.3g} ({worst}; weights up to {scale:.3g}), "
              f"ln_post {post:.3g}; {runs[b]['seconds'] / runs[a]['seconds']:.2f}x our time")

    print()
    compare("ours_regmean_plusplus", "fusionbench_regmean_plusplus", "RegMean++ merge")
    if "ours_regmean_plusplus" in results and "ours_regmean" in results:
        x, y = results["ours_regmean_plusplus"]["merged"], results["ours_regmean"]["merged"]
        print(f"RegMean++ against our RegMean: max |difference| {max_abs(x, y, x)[0]:.3g} (the method's effect)")
    compare("ours_fisher_fusionbench", "fusionbench_fisher", "Fisher merge, fusionbench estimator")
    if "ours_fisher_fusionbench" in results and "fusionbench_fisher" in results:
        ours_f, fb_f = results["ours_fisher_fusionbench"]["fishers"], results["fusionbench_fisher"]["fishers"]
        for k in range(cfg["tasks"]):
            a, b = ours_f[f"fisher task{k}"], fb_f[f"task{k}"]
            keys = sorted(set(a) & set(b) - {"proj"})
            diff, worst = max_abs(a, b, keys)
            rel = max(float((a[key] - b[key]).abs().max() / b[key].abs().max()) for key in keys)
            print(f"  Fisher task{k}: max |ours - FusionBench| {diff:.3g} ({worst}), {rel:.2g} of the tensor's largest "
                  f"entry at most")
        from pipeline.merging.fisher_merging import fisher_average

        config, _, finetuned, projection, _, _ = zoo(cfg)
        states = [to_open_clip(m.state_dict(), config, projection) for m in finetuned]
        without = [{key: f for key, f in ours_f[f"fisher task{k}"].items() if key != "proj"} for k in range(len(states))]
        x, y = fisher_average(zip(states, without)), results["fusionbench_fisher"]["merged"]
        print(f"  our merge with proj's Fisher out of the unit-norm scaling: max |ours - FusionBench| "
              f"{max_abs(x, y, sorted(set(x) & set(y)))[0]:.3g}")
    exact = results.get("ours_fisher_exact")
    for estimator in ("sampled", "fusionbench"):
        other = results.get(f"ours_fisher_{estimator}")
        if exact and other:
            distances = []
            for key in exact["fishers"]:
                e, o = exact["fishers"][key], other["fishers"][key]
                flat_e = torch.cat([v.reshape(-1) for v in e.values()])
                flat_o = torch.cat([o[k].reshape(-1) for k in e])
                distances.append(float((flat_o - flat_e).norm() / flat_e.norm()))
            print(f"Fisher {estimator} against exact: relative L2 distance {min(distances):.2f}-{max(distances):.2f} "
                  f"over the tasks")


if __name__ == "__main__":
    main()
