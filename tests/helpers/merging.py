"""The merging methods' test stores and tiny trainable zoos, their runs through the registry,
and the dense torch references the methods are checked against."""
import math

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from helpers.store import CHUNK_MIB
from pipeline.merging import registry
from pipeline.merging.contract import Inputs
from pipeline.store.task_vectors import TaskVectorStore, write_task_vector

TASKS = ("a", "b", "c", "d")


def make_store(tmp_path, fts: dict, pre: dict) -> TaskVectorStore:
    for t, ft in fts.items():
        save_file(ft, tmp_path / f"{t}.safetensors")
        write_task_vector(tmp_path / "tv.zarr", t, pre, ft, tmp_path / f"{t}.safetensors", CHUNK_MIB)
    return TaskVectorStore(tmp_path / "tv.zarr", list(fts))


def merged(name: str, pre: dict, store: TaskVectorStore, **settings) -> dict:
    """The merge of method ``name`` through its registry entry, as production runs it."""
    spec = registry.method(name)
    return spec.run(Inputs(pre, store.tasks, store), spec.configure(settings)).state_dict()


def vector(name: str, store: TaskVectorStore, budget_mib: float = 1024, **settings) -> dict:
    """The merged task vector of a streamed method (before its lambda), through its registry entry."""
    spec = registry.method(name)
    return spec.run(Inputs({}, store.tasks, store, budget_mib=budget_mib), spec.configure(settings)).vector()


def flat(vector: dict, store: TaskVectorStore) -> torch.Tensor:
    """A merged task vector concatenated in store order."""
    return torch.cat([vector[key].reshape(-1) for key in store.keys])


def routed_states(name: str, pre: dict, store: TaskVectorStore, path, budget_mib: float = 1024,
                  **settings) -> tuple[list[dict], dict]:
    """Each task's state dict from the saved merge of task-routed method ``name``, and the save's summary."""
    from pipeline.merging.streamed import task_states

    spec = registry.method(name)
    summary = spec.run(Inputs(pre, store.tasks, store, budget_mib=budget_mib), spec.configure(settings)).save(path)
    return list(task_states(path, pre, store.tasks)), summary


def dense_ties(tvs: torch.Tensor, k: float, merge: str) -> torch.Tensor:
    """TIES semantics (kernels.ties_merge docstring), written directly."""
    d = tvs.shape[1]
    keep = math.floor(d * k / 100)
    mags = tvs.abs()
    if keep == d:
        thr = torch.zeros(len(tvs), 1, dtype=tvs.dtype)
    else:
        thr = mags.sort(dim=1).values[:, d - keep - 1:d - keep]  # the (d - keep)-th smallest, 1-based
    trimmed = torch.where(mags >= thr, tvs, 0.0)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    total = torch.where(agree, trimmed, 0.0).sum(0)
    return total / agree.sum(0).clamp(min=1) if merge == "mean" else total


def dense_consensus(tvs: torch.Tensor, mtl: torch.Tensor, agree: int, mask_lambda: float) -> torch.Tensor:
    """Consensus merging (Wang et al., 2024) in float64: c * tau_MTL with the consensus mask
    c = [sum_t (|tau_t| >= lambda |tau_MTL - tau_t|) >= k]."""
    tvs, mtl = tvs.double(), mtl.double()
    on = (tvs.abs() >= mask_lambda * (mtl - tvs).abs()).sum(0)
    return torch.where(on >= agree, mtl, 0.0)


def float_keys(pre):
    return [k for k, v in pre.items() if v.is_floating_point()]


def task_stacks(pre, fts) -> dict[str, torch.Tensor]:
    """Per floating tensor its (K, *shape) fp32 task vectors, in memory."""
    return {k: torch.stack([ft[k].float() - pre[k].float() for ft in fts.values()]) for k in float_keys(pre)}


def polar64(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal Procrustes factor of a full-rank matrix in float64, from the symmetric
    inverse square root: x (x^T x)^-1/2, or (x x^T)^-1/2 x for a wide x."""
    x = x.double()
    wide = x.shape[0] < x.shape[1]
    gram = x @ x.T if wide else x.T @ x
    vals, vecs = torch.linalg.eigh(gram)
    inv_sqrt = vecs @ torch.diag(vals.rsqrt()) @ vecs.T
    return inv_sqrt @ x if wide else x @ inv_sqrt


def dense_tvs(pre, fts) -> torch.Tensor:
    """(K, d) task vectors over the concatenation of all floating tensors."""
    return torch.stack([torch.cat([(ft[k].float() - pre[k].float()).reshape(-1) for k in float_keys(pre)])
                        for ft in fts.values()])


def unflatten(pre, flat: torch.Tensor, lam: float) -> dict:
    out, i = dict(pre), 0
    for k in float_keys(pre):
        n = pre[k].numel()
        out[k] = (pre[k].float() + lam * flat[i:i + n].reshape(pre[k].shape)).to(pre[k].dtype)
        i += n
    return out


def assert_state_close(got, expected, exact=False):
    assert got.keys() == expected.keys()
    for k in got:
        assert got[k].dtype == expected[k].dtype, k
        if exact or not got[k].is_floating_point():
            assert torch.equal(got[k], expected[k]), k
        else:
            torch.testing.assert_close(got[k].float(), expected[k].float(), rtol=1e-6, atol=1e-6)


# ---- methods that read models and data -------------------------------------------------------

def _classification(seed: int, n: int = 200, dim: int = 6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = (x @ torch.randn(dim, generator=g) > 0).long()
    return x, y


FT_CFG = {"steps": 40, "batch_size": 32, "lr": 0.05, "weight_decay": 0.0, "warmup": 2}


def _tiny_zoo():
    torch.manual_seed(0)
    encoder = nn.Linear(6, 4)
    pretrained = {k: v.clone() for k, v in encoder.state_dict().items()}
    heads = [torch.randn(2, 4, generator=torch.Generator().manual_seed(10 + i)) * 10 for i in range(2)]
    data = [_classification(1 + i) for i in range(2)]
    return encoder, pretrained, heads, data


def train_jointly(encoder, heads, data) -> dict:
    """Multi-task learning through its registry entry."""
    spec = registry.method("multitask")
    inputs = Inputs({}, [str(i) for i in range(len(heads))], encoder=encoder, heads=heads,
                    train=[TensorDataset(*d) for d in data], progress=False)
    return spec.run(inputs, spec.configure(FT_CFG)).state_dict()
