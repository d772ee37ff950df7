"""TIES-Merging (Yadav et al., NeurIPS 2023): trim each task vector to its top-k% magnitudes
(global over all tensors), elect a sign per entry, merge the agreeing entries (dis-mean or
dis-sum), theta_pre + lambda * merged. Exact semantics: ``kernels.ties_merge``.

The store is streamed by the generic engine of :mod:`pipeline.store.streaming`; this module
holds the TIES reducer for it (:class:`Ties`) and the exact-threshold passes, beside the
method's entry functions, so the method's code is one module (which the workflow's
``code_version`` of the TIES jobs hashes) and the store knows no method. Exact TIES needs
statistics before the apply pass:

1. a sample pass over 16 chunks spread evenly over the entries (about ``sample`` entries per
   task kept) estimates each task's top-k threshold and brackets it with a band;
2. a counting pass counts the entries above the band and collects those inside it, which
   gives the exact threshold (the band holds it) or, when the sample misjudged it, two exact
   histogram passes for that task follow (16-bit digit of the |x| bit pattern, then the
   matching entries);
3. the apply pass trims, elects and merges (``kernels.ties_apply``: Triton on CUDA) with the
   majority sign assumed positive, while it counts the elected signs and keeps the few
   entries whose elected sign is exactly zero although some task kept them; if the majority
   turns out not positive those entries are patched at the end (the reducer's ``patches``).

With ``count_over: official_encoder`` each task vector is counted as the AdaMerging code counts
it, over the whole official ``ImageEncoder`` whose text-side tensors have zero task vectors
(:func:`pipeline.models.clip.zeros_counted`): those zeros are
the smallest magnitudes, so only the rank of the threshold among the visual entries changes.

So exact TIES reads the store about twice. Memory beyond the engine's budget: the sample
(4 MiB per task) and the band's candidates (0.8% of the store's entries, narrowed to at most
an eighth of the budget on very large stores; the histogram fallback collects one 16-bit
bucket per task, which is not bounded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kernels import TiesStats, ties_apply
from kernels.ties_merge import n_keep, ties_trimmed_sum
from pipeline.merging.contract import Inputs
from pipeline.merging.streamed import StreamedMerge
from pipeline.models.clip import COUNTS, zeros_counted
from pipeline.store.streaming import Reader

MERGES = ("mean", "sum")
SAMPLE_CHUNKS = 16
_BITS = 0x7FFFFFFF  # magnitude bits of an fp32 pattern
_LOW = 15  # the histogram fallback's second digit: 16 high bits, then 15 low bits


@dataclass
class Ties:
    """TIES(tau) with top-``k``% trimming and dis-``merge``: a reducer of
    :mod:`pipeline.store.streaming` (see module doc); scale it with
    :class:`pipeline.merging.streamed.Scaled`."""

    k: float = 20.0
    merge: str = "mean"
    sample: int = 1 << 20  # entries per task read by the sample pass (0: no sample)
    band: float = 0.004  # half-width, in quantile, of the band collected around the estimate
    extra: int = 0  # zero entries counted with each task vector (count_over official_encoder)
    thresholds: torch.Tensor | None = None
    _elected: int = 0
    _ambiguous: list = field(default_factory=list)

    def prepare(self, reader: Reader) -> None:
        self.thresholds = exact_thresholds(reader, self.k, self.sample, self.band, self.extra)
        self._apply = reader.op(_ties_block)

    def __call__(self, key: str, span: slice, block: torch.Tensor) -> torch.Tensor:
        thr = self.thresholds.to(block.device)
        out, elected, ambiguous = self._apply(block, thr, self.merge == "mean")
        self._elected += int(elected)
        where = torch.nonzero(ambiguous)[:, 0]
        if len(where):  # exact cancellations: their result depends on the majority sign
            negative = TiesStats(thr, torch.full((), -1, dtype=torch.int32, device=block.device))
            values = ties_apply(block[:, where].contiguous(), negative, self.merge)
            self._ambiguous.append((key, where.cpu() + span.start, values.cpu()))
        return out

    def patches(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(key, flat indices, merged values) to overwrite once the majority sign is known."""
        return self._ambiguous if self._elected <= 0 else []


def _ties_block(block: torch.Tensor, thr: torch.Tensor, mean: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TIES of one block with the majority sign taken positive, the sum of its elected signs,
    and the entries whose elected sign is zero although a task kept them."""
    positive = TiesStats(thr, torch.ones((), dtype=torch.int32, device=block.device))
    out = ties_apply(block, positive, "mean" if mean else "sum")
    elected = ties_trimmed_sum(block, thr)
    kept = ((block.abs() >= thr[:, None]) & (block != 0)).any(0)
    return out, elected.sign().sum(), (elected == 0) & kept


def _bits(block: torch.Tensor) -> torch.Tensor:
    return block.view(torch.int32) & _BITS


def _count_above(block: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Per task the entries whose magnitude bits are above ``hi``."""
    return (_bits(block) > hi[:, None]).sum(1)


def _band_mask(block: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The entries whose magnitude bits are in [lo, hi] (a separate op: fused with the count,
    the compiled loop is several times slower)."""
    bits = _bits(block)
    return (bits >= lo[:, None]) & (bits <= hi[:, None])


def _spread(spans: list[tuple[str, slice]], n: int) -> list[tuple[str, slice]]:
    """The chunks holding ``n`` entry positions spread evenly over all entries."""
    ends = torch.tensor([s.stop - s.start for _, s in spans]).cumsum(0)
    where = torch.arange(n, dtype=torch.float64).add(0.5).mul(int(ends[-1]) / n).long()
    return [spans[i] for i in sorted(set(torch.searchsorted(ends, where, right=True).tolist()))]


def exact_thresholds(reader: Reader, k: float, sample: int = 1 << 20, band: float = 0.004,
                     extra: int = 0) -> torch.Tensor:
    """Per-task exact top-``k``% magnitude thresholds (the semantics of ``kernels.ties_merge``),
    each task vector counted with ``extra`` zeros: the threshold is then the rank-th smallest of
    the store's d entries with rank = d - floor((d + extra) k / 100) (0 when that keeps all).

    A second exact select beside ``kernels.ties_thresholds``, on purpose: the store path must
    hold a fixed memory budget over chunks read from disk and read them about once, whereas
    the kernels' twin selects on the whole resident tensor (kthvalue) and their Triton radix
    select reads every chunk 4 times; the twin stays the plain reference this is tested against.
    """
    n_tasks, d = len(reader.store.tasks), reader.store.numel()
    keep = n_keep(d + extra, k)
    if keep >= d:
        return torch.zeros(n_tasks)
    rank = d - keep  # 1-based rank from below; the threshold is the rank-th smallest |x|
    top = d - rank + 1  # ... the top-th largest
    lo = torch.zeros(n_tasks, dtype=torch.int64)
    hi = torch.full((n_tasks,), -1, dtype=torch.int64)  # empty band: every task falls back
    spans = list(reader.store.spans())
    band = min(band, reader.budget_mib * 2**20 / (64 * n_tasks * d))  # 2 band d K fp32 candidates <= budget / 8
    if sample > 0:
        picked = _spread(spans, SAMPLE_CHUNKS)
        stride = max(1, math.ceil(sum(s.stop - s.start for _, s in picked) / sample))
        rows = zip(*(_bits(b[:, ::stride]).cpu().unbind(0) for _, _, b in reader.blocks(picked, desc="TIES sample")))
        for j, parts in enumerate(rows):
            bits = torch.cat(parts).sort().values
            q = torch.tensor([max(rank / d - band, 0.0), min(rank / d + band, 1.0)], dtype=torch.float64)
            lo[j], hi[j] = bits[(q * (len(bits) - 1)).round().long()].tolist()
            del bits
    above = torch.zeros(n_tasks, dtype=torch.int64)
    inside: list[list[torch.Tensor]] = [[] for _ in range(n_tasks)]
    lo_d, hi_d = lo.to(reader.device, torch.int32), hi.to(reader.device, torch.int32)
    count, band_mask = reader.op(_count_above), reader.op(_band_mask)
    for _, _, block in reader.blocks(spans, desc="TIES thresholds"):
        above += count(block, hi_d).cpu()
        rows, cols = torch.nonzero(band_mask(block, lo_d, hi_d), as_tuple=True)
        values = _bits(block[rows, cols]).cpu()
        for j, part in enumerate(values.split(torch.bincount(rows, minlength=n_tasks).tolist())):
            inside[j].append(part)
    thresholds = torch.empty(n_tasks, dtype=torch.int32)
    missed = []
    for j in range(n_tasks):
        cand = torch.cat(inside[j])
        if above[j] < top <= above[j] + len(cand):
            thresholds[j] = cand.kthvalue(len(cand) - (top - int(above[j])) + 1).values
        else:
            missed.append(j)
    del inside
    if missed:
        thresholds[missed] = _histogram_thresholds(reader, spans, missed, top)
    return thresholds.view(torch.float32)


def _histogram_thresholds(reader: Reader, spans: list, tasks: list[int], top: int) -> torch.Tensor:
    """Exact thresholds of ``tasks`` in two passes: a histogram of the 16 high magnitude bits,
    then the entries in the bucket that holds the top-th largest."""
    hist = torch.zeros(len(tasks), 1 << 16, dtype=torch.int64)
    rows = torch.tensor(tasks, device=reader.device)
    for _, _, block in reader.blocks(spans, desc="TIES histogram"):
        digit = _bits(block[rows]) >> _LOW
        offset = torch.arange(len(tasks), device=block.device)[:, None] << 16
        hist += torch.bincount((digit + offset).reshape(-1), minlength=len(tasks) << 16).view(len(tasks), -1).cpu()
    from_top = hist.flip(1).cumsum(1)  # entries at or above each bucket, from the highest bucket
    bucket = (1 << 16) - 1 - (from_top < top).sum(1)
    above = from_top.gather(1, ((1 << 16) - 2 - bucket).clamp(min=0)[:, None])[:, 0] * (bucket < (1 << 16) - 1)
    inside: list[list[torch.Tensor]] = [[] for _ in tasks]
    for _, _, block in reader.blocks(spans, desc="TIES bucket"):
        for i, j in enumerate(tasks):
            row = _bits(block[j])
            inside[i].append(row[(row >> _LOW) == int(bucket[i])].cpu())
    out = torch.empty(len(tasks), dtype=torch.int32)
    for i in range(len(tasks)):
        cand = torch.cat(inside[i])
        out[i] = cand.kthvalue(len(cand) - (top - int(above[i])) + 1).values
    return out


def check_trim_and_merge(k: float, merge: str, who: str) -> None:
    """Refuse a TIES ``k`` outside [0, 100] or a ``merge`` other than MERGES, naming ``who``
    (TIES-Merging, and the methods built on its reducer)."""
    if merge not in MERGES:
        raise ValueError(f"{who} merge must be one of {MERGES}, got {merge!r}")
    if not 0 <= k <= 100:
        raise ValueError(f"{who} k must be a percentage in [0, 100], got {k}")


@dataclass(frozen=True)
class Settings:
    """``k``: 20, the percentage of entries each task vector keeps (TIES paper, Sec. 5,
    "top-20%"); ``merge``: "mean", the paper's disjoint mean ("sum": the AdaMerging code's
    dis-sum, src/main_ties_merging.py); ``lam``: 0.3, the paper's best scaling on validation
    (Appendix C.4) and the AdaMerging code's fixed one; ``count_over``: "visual", the top-k% of
    the image encoder's entries (FusionBench's CLIPVisionModel), or "official_encoder": of the
    AdaMerging code's whole ``ImageEncoder`` state dict (zero text-side entries included, see
    the module doc; needs ``Inputs.arch``)."""

    k: float = 20.0
    merge: str = "mean"
    lam: float = 0.3
    count_over: str = "visual"

    def __post_init__(self):
        check_trim_and_merge(self.k, self.merge, "TIES")
        if self.count_over not in COUNTS:
            raise ValueError(f"TIES count_over must be one of {COUNTS}, got {self.count_over!r}")


def run(inputs: Inputs, settings: Settings = Settings()) -> StreamedMerge:
    """theta_pre + ``lam`` * TIES(task vectors) with top-``k``% trimming (counted over
    ``count_over``) and dis-``merge``."""
    ties = Ties(settings.k, settings.merge, extra=zeros_counted(settings.count_over, inputs.arch))
    return StreamedMerge(inputs, ties, settings.lam, desc="TIES")
