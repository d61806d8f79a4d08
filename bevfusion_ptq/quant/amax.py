"""Amax from a collected histogram: MSE, entropy (KL) and percentile, vectorised.

pytorch-quantization 2.1.3 computes histogram amax with Python loops over every candidate
bin: MSE runs one fake-quantization per candidate (about 1900 of them for 2048 bins, 0.3 to
0.8 s per quantizer, most of it launch and sync overhead on a GPU) and moves the histogram to
CUDA unconditionally; entropy runs two Python loops over the bins for every candidate, cost
quadratic in the bin count: seconds at 2048 bins, minutes once a histogram has grown. For
200 quantizers that is the slowest step after collection, and MSE cannot run without a GPU.

The functions here work in two passes, on whatever device the histogram lives:

1. a closed-form screen of every candidate: prefix sums of the histogram turn a candidate's
   error into one term per quantization level (MSE) or per merged group (entropy), so its
   cost is candidates x 128 instead of candidates x bins. A histogram that grew to 60k bins
   costs about 0.2 s on a CPU instead of 3 s (MSE) and 30 s (entropy) for the row pass alone;
2. the library's own arithmetic, as ``[candidates, bins]`` matrices in chunks of bounded
   size, for the few candidates that the screen puts near the minimum (within a margin far
   above the float error of both passes). The pick among those is the pick among all: a
   test compares it with the exact rows of every candidate on grown histograms.

The second pass reproduces the library's arithmetic so that the chosen bin is the same:

* MSE mirrors ``_compute_amax_mse``: bin centres in float32, the library's fake-quant
  rounding (``scale = max_bound / amax``, round half to even, clamp, divide by the scale,
  amax below 2**-24 quantizes everything to zero), the count-weighted mean in float32, and
  the FIRST candidate of minimal error. The amax is a bin centre.
* Entropy mirrors ``_compute_amax_entropy``, quirks included: bin 0 takes bin 1's count,
  candidate ``i`` merges bins ``[0, i)`` into ``2**(bits-1+unsigned)`` groups exactly as
  ``np.digitize(range(i), np.linspace(0, i, nbins + 1)) - 1`` does (``floor(j*nbins/i)``,
  exact because ``nbins`` is a power of two), empty bins take no share of their group,
  counts above ``i`` are clipped into bin ``i - 1``, the divergence follows
  ``scipy.stats.entropy`` (``inf`` where the reference has mass and the candidate none,
  ``nan`` where the candidate has no mass at all), and the LAST candidate of minimal
  divergence wins (the last ``nan`` if any, as numpy's argmin on the reversed list does). The
  amax is a bin edge. It is computed in float64.
* Percentile mirrors ``_compute_amax_percentile`` (float64 cumulative sum, first bin whose
  cumulative share reaches the percentile). It runs on the CPU: it is tiny, and a sequential
  cumsum there has the same summation order as numpy's.

On the CPU the MSE errors are bit-identical to the library's (a row of the matrix is
reduced exactly like the library's 1-D tensor). On CUDA the row reduction and the library's
1-D reduction sum in different orders, so an error can differ by a few float32 ulps; where
two candidates lie that close, the library's own pick is float noise and ours may be a few
bins away. For entropy, summation order and ``log`` differ from numpy/scipy (pairwise sums,
libm), so divergences agree to a few ulps, not bit for bit; exact ties (zero divergence,
``inf``, ``nan``) are reproduced exactly.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from bevfusion_ptq.errors import CalibrationError

log = logging.getLogger(__name__)

HISTOGRAM_METHODS: tuple[str, ...] = ("mse", "entropy", "percentile")

# Elements of one [candidates, bins] working matrix. A few such matrices live at once, so
# this bounds peak memory to a few hundred MB even for histograms that grew far past 2048.
DEFAULT_CHUNK_ELEMENTS = 4 * 1024 * 1024

# Candidates per entropy chunk: small enough that trimming columns to the chunk's largest
# candidate saves most of the [candidates, bins] triangle that lies past each candidate.
_ENTROPY_ROWS = 128

# pytorch-quantization treats amax at or below this as zero (smallest fp16 subnormal range).
_ZERO_AMAX_EPSILON = 1.0 / (1 << 24)


def _checked_edges(hist: Tensor, bin_edges: Tensor, start_bin: int, stride: int) -> Tensor:
    """Validate a histogram; return the edges of its bins (one more than the bins).

    pytorch-quantization's growth step can leave one or two edges too many: it counts the
    new bins with a float32 division but makes the edges with ``torch.arange``, which sizes
    itself in double precision (seen about once in 2000 growth steps). Its entropy and
    percentile methods index edges by bin number and ignore the surplus; its MSE method fails
    on a shape mismatch. We do as the former for all methods, and log it.
    """
    if hist.dim() != 1 or bin_edges.dim() != 1:
        raise CalibrationError(
            f"histogram and bin edges must be 1-D, got shapes {tuple(hist.shape)} and {tuple(bin_edges.shape)}"
        )
    if bin_edges.numel() < hist.numel() + 1:
        raise CalibrationError(
            f"a histogram of {hist.numel()} bins needs {hist.numel() + 1} bin edges, got {bin_edges.numel()}"
        )
    if bin_edges.numel() > hist.numel() + 1:
        log.warning(
            "histogram of %d bins has %d bin edges (pytorch-quantization's growth step); using the first %d",
            hist.numel(), bin_edges.numel(), hist.numel() + 1,
        )
        bin_edges = bin_edges[: hist.numel() + 1]
    if stride < 1:
        raise CalibrationError(f"stride must be >= 1, got {stride}")
    if start_bin < 0:
        raise CalibrationError(f"start_bin must be >= 0, got {start_bin}")
    if not bool(torch.isfinite(hist).all()) or not bool(torch.isfinite(bin_edges).all()):
        raise CalibrationError("histogram or bin edges hold non-finite values (non-finite activations?)")
    if bool((hist < 0).any()):
        raise CalibrationError("histogram holds negative counts")
    return bin_edges


def _chunk_size(num_bins: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(1, num_bins))


def _mse_errors(
    centers: Tensor, counts: Tensor, candidates: Tensor, num_bits: int, unsigned: bool, chunk_elements: int
) -> Tensor:
    """The library's float32 error of each candidate bin, row by row (exact, ``[m, bins]`` work)."""
    device = centers.device
    num_bins = centers.numel()
    bound = 2.0 ** (num_bits - 1 + int(unsigned)) - 1.0
    # A float32 tensor, as in the library: ``python_float / tensor`` would multiply by a
    # reciprocal instead of dividing and round differently.
    max_bound = torch.tensor(bound, dtype=torch.float32, device=device)
    min_bound = 0.0 if unsigned else -bound  # fake_tensor_quant's default narrow_range=True
    # Amax at or below 2**-24 quantizes everything to zero in the library; candidates ascend,
    # so only the smallest needs a look (one device sync, not one per chunk).
    any_zero_amax = bool(centers[candidates[0]] <= _ZERO_AMAX_EPSILON)
    rows = _chunk_size(num_bins, chunk_elements)
    error = torch.empty(candidates.numel(), dtype=torch.float32, device=device)
    for begin in range(0, candidates.numel(), rows):
        amax = centers[candidates[slice(begin, begin + rows)]].unsqueeze(1)  # [m, 1]
        scale = max_bound / amax
        if any_zero_amax:
            # The library zeroes a tiny amax's scale before rounding, then divides by 1.
            zero_amax = amax <= _ZERO_AMAX_EPSILON
            quant_scale = scale.masked_fill(zero_amax, 0.0)
            out_scale = scale.masked_fill(zero_amax, 1.0)
        else:
            quant_scale = out_scale = scale
        # The library's expression, in place: ((round(c*s).clamp(-b, b) / s - c)**2 * n).mean()
        chunk = (centers * quant_scale).round_().clamp_(min_bound, bound).div_(out_scale).sub_(centers)
        error[begin:begin + rows] = chunk.pow_(2).mul_(counts).mean(dim=1)
    return error


def _mse_screen(
    centers: Tensor, counts: Tensor, candidates: Tensor, num_bits: int, unsigned: bool, chunk_elements: int
) -> Tensor:
    """Every candidate's error in closed form, float64, ``[candidates, levels]`` work.

    The quantization levels split the sorted bin centres into runs: the centres that round
    to level ``m`` all become ``m / s``, so a run's squared error is
    ``n (m/s)**2 - 2 (m/s) sum(n c) + sum(n c**2)``, three differences of prefix sums. The
    top level also takes every clipped centre. Exact arithmetic except for rounding, so it
    ranks candidates as :func:`_mse_errors` does up to float noise (see :func:`mse_amax`).
    """
    bound = int(2 ** (num_bits - 1 + int(unsigned)) - 1)
    c = centers.to(torch.float64)
    n = counts.to(torch.float64)
    zero = n.new_zeros(1)
    prefix = torch.stack([torch.cat([zero, torch.cumsum(v, 0)]) for v in (n, n * c, n * c * c)])  # [3, bins + 1]
    levels = torch.arange(bound + 1, dtype=torch.float64, device=c.device)
    # Bins are equally wide: the centres below t number ceil(t / width - 0.5). Where float
    # rounding puts a centre lying on a level boundary into the neighbouring level, its error
    # is the same either way (it is half a step from both).
    width = (c[-1] - c[0]) / max(1, c.numel() - 1) if c.numel() > 1 else c[0] * 2
    rows = _chunk_size(bound + 1, chunk_elements // 8)  # a handful of [rows, levels] float64 matrices
    screen = torch.empty(candidates.numel(), dtype=torch.float64, device=c.device)
    for begin in range(0, candidates.numel(), rows):
        step = c[candidates[begin:begin + rows]].unsqueeze(1) / bound  # [m, 1]: level spacing 1/s
        # Level m holds the centres in [(m - 0.5) / s, (m + 0.5) / s); the top level is open.
        starts = ((levels - 0.5).clamp_min(0) * step / width - 0.5).ceil_().clamp_(0, c.numel()).long()
        ends = torch.cat([starts[:, 1:], starts.new_full((starts.shape[0], 1), c.numel())], dim=1)
        s0, s1, s2 = (prefix[:, ends] - prefix[:, starts]).unbind(0)
        value = levels * step  # [m, levels]
        screen[begin:begin + rows] = (s0 * value * value - 2 * value * s1 + s2).sum(dim=1)
    return screen / c.numel()


def _near_minimum(screen: Tensor, scale: Tensor) -> Tensor:
    """Positions whose screened value could be the exact minimum.

    The margin, 1e-4 of the minimum plus 1e-10 of ``scale`` (the histogram's mean squared
    value, the size of the prefix sums the screen cancels), lies far above the float error
    of either computation: float64 here, float32 terms and sums in the library's.
    """
    best = screen.min()
    return torch.nonzero(screen <= best + 1e-4 * best.abs() + 1e-10 * scale).flatten()


def mse_amax(
    hist: Tensor,
    bin_edges: Tensor,
    num_bits: int = 8,
    unsigned: bool = False,
    start_bin: int = 128,
    stride: int = 1,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Tensor:
    """Bin centre that minimises the count-weighted squared fake-quantization error.

    Same answer as ``pytorch_quantization.calib.histogram._compute_amax_mse``: candidates are
    the centres of bins ``start_bin, start_bin + stride, ... < len(hist)``; ties keep the
    first. Returns a 0-dim float32 tensor on the histogram's device.

    Two passes, so that a histogram that grew to 100k bins costs well under a second instead
    of minutes: a closed-form screen of every candidate (:func:`_mse_screen`, cost
    proportional to candidates x levels), then the library's exact row arithmetic
    (:func:`_mse_errors`) for the candidates the screen puts within 1e-4 of the minimum. The
    pick among those is the library's pick among all.
    """
    bin_edges = _checked_edges(hist, bin_edges, start_bin, stride)
    device = hist.device
    counts = hist.to(torch.float32)
    edges = bin_edges.to(device=device, dtype=torch.float32)
    centers = (edges[1:] + edges[:-1]) / 2
    num_bins = centers.numel()
    if start_bin >= num_bins:
        raise CalibrationError(
            f"MSE amax needs more than start_bin={start_bin} bins, the histogram has {num_bins}"
        )
    candidates = torch.arange(start_bin, num_bins, stride, device=device)
    if bool(centers[start_bin] > _ZERO_AMAX_EPSILON):  # else the library's zero-amax rule applies
        screen = _mse_screen(centers, counts, candidates, num_bits, unsigned, chunk_elements)
        if bool(torch.isfinite(screen).all()):
            energy = (counts.double() * centers.double() ** 2).sum() / num_bins
            candidates = candidates[_near_minimum(screen, energy)]
    error = _mse_errors(centers, counts, candidates, num_bits, unsigned, chunk_elements)
    # np.argmin semantics: the first nan if any, else the first minimum.
    nan = torch.isnan(error)
    if bool(nan.any()):
        best = int(torch.nonzero(nan)[0])
    else:
        best = int(torch.nonzero(error == error.min())[0])
    return centers[candidates[best]].clone()


class _EntropyTables:
    """Prefix sums of one histogram that both entropy passes read (float64, on its device)."""

    def __init__(self, hist: Tensor, num_bits: int, unsigned: bool) -> None:
        bins = hist.to(torch.float64).clone()
        bins[0] = bins[1]  # the library's quirk
        self.bins = bins
        self.nbins = 1 << (num_bits - 1 + int(unsigned))
        zero = bins.new_zeros(1)
        self.cum_counts = torch.cat([zero, torch.cumsum(bins, 0)])  # exact for integral counts
        self.nonzero = (bins != 0).to(torch.float64)
        self.cum_nonzero = torch.cat([zero, torch.cumsum(self.nonzero, 0)])
        self.total = self.cum_counts[-1]
        self.group_ids = torch.arange(self.nbins + 1, device=bins.device)

    def groups(self, cand: Tensor) -> tuple[Tensor, Tensor]:
        """Sum and mean (over non-empty bins) of each merged group, per candidate ``[m, 1]``.

        Group k of candidate i holds bins j with floor(j * nbins / i) == k, i.e. the bins from
        ceil(k * i / nbins) up to ceil((k + 1) * i / nbins). Empty bins take no share.
        """
        bounds = (self.group_ids * cand + self.nbins - 1) // self.nbins  # [m, nbins + 1]
        group_sum = self.cum_counts[bounds[:, 1:]] - self.cum_counts[bounds[:, :-1]]
        group_nonzero = self.cum_nonzero[bounds[:, 1:]] - self.cum_nonzero[bounds[:, :-1]]
        return group_sum, group_sum / group_nonzero.clamp_min(1)


def _entropy_divergences(t: _EntropyTables, candidates: Tensor, chunk_elements: int) -> Tensor:
    """The divergence of each candidate (ascending), bin by bin as scipy sums it: ``[m, i]`` work."""
    bins, nbins, total = t.bins, t.nbins, t.total
    share = bins / total  # the reference distribution below the candidate
    positions = torch.arange(bins.numel(), device=bins.device)
    # Rows are candidates in ascending order: a chunk needs only the columns below its
    # largest candidate, so small chunks skip most of the empty upper triangle.
    rows = min(_chunk_size(bins.numel(), chunk_elements), _ENTROPY_ROWS)
    divergences = []
    for begin in range(0, candidates.numel(), rows):
        cand = candidates[begin:begin + rows].unsqueeze(1)  # [m, 1]
        width = int(cand[-1])
        pos = positions[:width]
        _, group_mean = t.groups(cand)
        # An extra zero group at index nbins serves every bin at or past the candidate.
        group_mean = torch.nn.functional.pad(group_mean, (0, 1))
        group_of = torch.clamp((pos * nbins) // cand, max=nbins)  # [m, width]
        merged = torch.gather(group_mean, 1, group_of) * t.nonzero[:width]
        kept = t.cum_counts[cand]  # mass below the candidate: the merged histogram's total
        clipped = total - kept  # mass at or past the candidate, folded into bin i - 1

        p = share[:width] * (pos < cand - 1)
        p.scatter_(1, cand - 1, (bins[cand - 1] + clipped) / total)
        # scipy.special.rel_entr: x*log(x/y) for x, y > 0; 0 for x == 0; inf for x > 0, y == 0.
        terms = (p / (merged / kept)).log_().mul_(p).masked_fill_(p == 0, 0.0)
        divergence = terms.sum(dim=1)
        # No mass below the candidate: scipy divides 0 by 0 and the divergence is nan.
        divergences.append(divergence.masked_fill_(kept.squeeze(1) == 0, float("nan")))
    return torch.cat(divergences)


def _entropy_screen(t: _EntropyTables, candidates: Tensor, chunk_elements: int) -> Tensor:
    """Every candidate's divergence in closed form: ``[candidates, groups]`` work.

    Below bin ``i - 1`` a non-empty bin j of group k contributes
    ``(b_j / T) (log(b_j / T) - log(mean_k / K))``, with T the total and K the mass below i.
    Summed, that is ``(sum b log b - log T sum b) / T - sum_k S_k log(mean_k / K) / T``,
    where ``S_k`` is group k's mass below ``i - 1``: prefix sums and one term per group. Bin
    ``i - 1``, which also takes the clipped mass, is added on its own. nan where K is 0, as
    in the bin-by-bin sum.
    """
    bins, nbins, total = t.bins, t.nbins, t.total
    zero = bins.new_zeros(1)
    cum_blogb = torch.cat([zero, torch.cumsum(torch.where(bins > 0, bins * bins.clamp_min(1e-300).log(), 0.0), 0)])
    log_total = total.log()
    rows = _chunk_size(nbins, chunk_elements // 8)
    screen = torch.empty(candidates.numel(), dtype=torch.float64, device=bins.device)
    for begin in range(0, candidates.numel(), rows):
        cand = candidates[begin:begin + rows].unsqueeze(1)  # [m, 1]
        group_sum, group_mean = t.groups(cand)
        kept = t.cum_counts[cand]  # [m, 1]
        last = cand - 1
        b_last = bins[last]
        last_group = (last * nbins) // cand
        below = group_sum.scatter_add(1, last_group, -b_last)  # each group's mass below i - 1
        merged = torch.where(below > 0, below * (group_mean / kept).log(), 0.0).sum(dim=1, keepdim=True)
        head = (cum_blogb[last] - log_total * t.cum_counts[last] - merged) / total
        p_last = (b_last + total - kept) / total
        q_last = torch.gather(group_mean, 1, last_group) * (b_last != 0) / kept
        tail = torch.where(p_last > 0, p_last * (p_last / q_last).log(), 0.0)
        screen[begin:begin + rows] = (head + tail).squeeze(1).masked_fill(kept.squeeze(1) == 0, float("nan"))
    return screen


def entropy_amax(
    hist: Tensor,
    bin_edges: Tensor,
    num_bits: int = 8,
    unsigned: bool = False,
    start_bin: int = 128,
    stride: int = 1,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Tensor:
    """Bin edge that minimises the KL divergence between the clipped and the merged histogram.

    Same answer as ``pytorch_quantization.calib.histogram._compute_amax_entropy`` (candidates
    ``i = start_bin, start_bin + stride, ... <= len(hist)``; the amax is ``bin_edges[i]``; ties
    keep the last). The caller's histogram is not modified (the library's numpy path writes
    ``bins[0] = bins[1]`` into the caller's array). Returns a 0-dim float32 tensor on the
    histogram's device.

    As for MSE, a closed-form screen of every candidate (:func:`_entropy_screen`) picks the
    few near the minimum, and only those are summed bin by bin (:func:`_entropy_divergences`).
    """
    bin_edges = _checked_edges(hist, bin_edges, start_bin, stride)
    device = hist.device
    num_bins = hist.numel()
    if num_bins < 2:
        raise CalibrationError(f"entropy amax needs at least 2 bins, the histogram has {num_bins}")
    if start_bin > num_bins:
        raise CalibrationError(
            f"entropy amax needs at least start_bin={start_bin} bins, the histogram has {num_bins}"
        )
    tables = _EntropyTables(hist, num_bits, unsigned)
    candidates = torch.arange(start_bin, num_bins + 1, stride, device=device)
    screen = _entropy_screen(tables, candidates, chunk_elements)
    nan = torch.isnan(screen)
    if bool(tables.total > 0) and not bool(nan.all()):
        # Divergences are O(1) sums of float64 terms: 1e-9 lies far above either's float error.
        # The nan candidates stay: the library prefers the last of them to any minimum.
        best = screen[~nan].min()
        candidates = candidates[nan | (screen <= best + 1e-6 * best.abs() + 1e-9)]
    divergence = _entropy_divergences(tables, candidates, chunk_elements)

    # The library takes np.argmin of the reversed list: the last nan if any, else the last minimum.
    nan = torch.isnan(divergence)
    if bool(nan.any()):
        best = int(torch.nonzero(nan)[-1])
    else:
        best = int(torch.nonzero(divergence == divergence.min())[-1])
    return bin_edges[int(candidates[best])].to(device=device, dtype=torch.float32, copy=True)


def percentile_amax(hist: Tensor, bin_edges: Tensor, percentile: float = 99.99) -> Tensor:
    """Left edge of the first bin whose cumulative share reaches ``percentile``.

    Same answer as ``_compute_amax_percentile``. Computed on the CPU in float64 (a sequential
    cumulative sum, as numpy's), returned as a 0-dim float32 tensor on the histogram's device.
    """
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    bin_edges = _checked_edges(hist, bin_edges, 0, 1)
    counts = hist.detach().to("cpu", torch.float64)
    total = counts.sum()
    if total == 0:
        index = 0  # numpy's searchsorted in the library's all-nan cdf (0 / 0) answers 0
    else:
        cdf = torch.cumsum(counts / total, 0)
        index = int(torch.searchsorted(cdf, torch.tensor([percentile / 100], dtype=torch.float64))[0])
    return bin_edges[index].to(device=hist.device, dtype=torch.float32, copy=True)


def compute_amax(
    hist: Tensor | None,
    bin_edges: Tensor | None,
    method: str,
    *,
    num_bits: int,
    unsigned: bool,
    start_bin: int = 128,
    stride: int = 1,
    percentile: float = 99.99,
) -> Tensor | None:
    """Amax of one histogram by ``method``; None when nothing was collected.

    This replaces ``HistogramCalibrator.compute_amax``. Max calibration is not a histogram
    method: max amax comes from ``MaxCalibrator`` itself.
    """
    if method not in HISTOGRAM_METHODS:
        raise ValueError(
            f"unknown histogram calibration method {method!r}; valid: {', '.join(HISTOGRAM_METHODS)} "
            "(max amax comes from the MaxCalibrator)"
        )
    if hist is None or bin_edges is None:
        return None
    hist = torch.as_tensor(hist)
    bin_edges = torch.as_tensor(bin_edges)
    if method == "mse":
        return mse_amax(hist, bin_edges, num_bits, unsigned, start_bin, stride)
    if method == "entropy":
        return entropy_amax(hist, bin_edges, num_bits, unsigned, start_bin, stride)
    return percentile_amax(hist, bin_edges, percentile)
