"""Fabricated task-vector stores: encoder-like state dicts and their fine-tuned copies, and
stores whose tasks hold given flat vectors split into the tensors of SHAPES."""
import torch

from pipeline.store.task_vectors import Storage, TaskVectorStore, write_diffs

CHUNK = 64  # entries per chunk in these tests
CHUNK_MIB = CHUNK * 4 / 2**20


def encoder_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"conv1.weight": torch.randn(8, 3, 2, 2, generator=g), "ln.bias": torch.randn(7, generator=g),
            "blocks.0.attn.in_proj_weight": torch.randn(24, 8, generator=g),
            "half.weight": torch.randn(5, 13, generator=g).half(), "ids": torch.arange(4)}


def finetune(pre: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v
            for k, v in pre.items()}


# ---- stores of given flat task vectors ------------------------------------------------------

TASKS = ["a", "b", "c", "d", "e"]
SHAPES = {"conv.weight": (6, 3, 3, 3), "ln.bias": (7,), "attn.in_proj_weight": (45, 15), "proj": (15, 11),
          "half.weight": (5, 13)}


def make_store(path, values: torch.Tensor, chunk_elems: int = 37, storage: Storage = Storage()) -> TaskVectorStore:
    """A store whose task j holds ``values[j]`` split into the tensors of SHAPES."""
    sizes = [torch.Size(s).numel() for s in SHAPES.values()]
    for j, task in enumerate(TASKS[: len(values)]):
        parts = values[j].split(sizes)
        diffs = ((k, p.reshape(s), torch.float16 if k == "half.weight" else torch.float32)
                 for (k, s), p in zip(SHAPES.items(), parts))
        write_diffs(path, task, diffs, "base", f"src-{task}", chunk_elems * storage.itemsize / 2**20, storage)
    return TaskVectorStore(path, TASKS[: len(values)])


def n_total() -> int:
    return sum(torch.Size(s).numel() for s in SHAPES.values())


def task_vectors(kind: str = "randn", k: int = 5, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "levels":  # ties at thresholds, zeros and exact sign cancellations
        return torch.randint(-3, 4, (k, n_total()), generator=g) * 0.5
    return torch.randn(k, n_total(), generator=g)
