"""The merging methods' test stores and tiny trainable zoos, their runs through the registry,
and the dense torch references the methods are checked against."""
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


def merged_vector(name: str, store: TaskVectorStore, **settings) -> dict:
    """The merged task vector of method ``name`` (before its lambda), streamed."""
    spec = registry.method(name)
    return spec.run(Inputs({}, store.tasks, store), spec.configure(settings)).vector()


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
