"""Amax from a collected histogram: MSE, entropy (KL) and percentile, vectorised.

pytorch-quantization 2.1.3 computes histogram amax with Python loops over every candidate
bin: MSE runs one fake-quantization per candidate (about 1900 of them for 2048 bins, 0.3 to
0.8 s per quantizer, most of it launch and sync overhead on a GPU) and moves the histogram to
CUDA unconditionally; entropy runs two Python loops over the bins for every candidate, cost
quadratic in the bin count: seconds at 2048 bins, minutes once a histogram has grown. For
200 quantizers that is the slowest step after collection, and MSE cannot run without a GPU.

The functions here evaluate all candidates at once as ``[candidates, bins]`` matrices, in
chunks of bounded size, on whatever device the histogram lives. They reproduce the library's
arithmetic so that the chosen bin is the same:

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

    bound = 2.0 ** (num_bits - 1 + int(unsigned)) - 1.0
    # A float32 tensor, as in the library: ``python_float / tensor`` would multiply by a
    # reciprocal instead of dividing and round differently.
    max_bound = torch.tensor(bound, dtype=torch.float32, device=device)
    min_bound = 0.0 if unsigned else -bound  # fake_tensor_quant's default narrow_range=True
    # Amax at or below 2**-24 quantizes everything to zero in the library; candidates ascend,
    # so only the smallest needs a look (one device sync, not one per chunk).
    any_zero_amax = bool(centers[start_bin] <= _ZERO_AMAX_EPSILON)
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
    # np.argmin semantics: the first nan if any, else the first minimum.
    nan = torch.isnan(error)
    if bool(nan.any()):
        best = int(torch.nonzero(nan)[0])
    else:
        best = int(torch.nonzero(error == error.min())[0])
    return centers[candidates[best]].clone()


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
    """
    bin_edges = _checked_edges(hist, bin_edges, start_bin, stride)
    device = hist.device
    bins = hist.to(torch.float64).clone()
    num_bins = bins.numel()
    if num_bins < 2:
        raise CalibrationError(f"entropy amax needs at least 2 bins, the histogram has {num_bins}")
    bins[0] = bins[1]
    if start_bin > num_bins:
        raise CalibrationError(
            f"entropy amax needs at least start_bin={start_bin} bins, the histogram has {num_bins}"
        )
    candidates = torch.arange(start_bin, num_bins + 1, stride, device=device)
    nbins = 1 << (num_bits - 1 + int(unsigned))

    cum_counts = torch.cat([bins.new_zeros(1), torch.cumsum(bins, 0)])  # exact for integral counts
    nonzero = (bins != 0).to(torch.float64)
    cum_nonzero = torch.cat([nonzero.new_zeros(1), torch.cumsum(nonzero, 0)])
    total = cum_counts[-1]
    share = bins / total  # the reference distribution below the candidate
    positions = torch.arange(num_bins, device=device)
    group_ids = torch.arange(nbins + 1, device=device)

    # Rows are candidates in ascending order: a chunk needs only the columns below its
    # largest candidate, so small chunks skip most of the empty upper triangle.
    rows = min(_chunk_size(num_bins, chunk_elements), _ENTROPY_ROWS)
    divergences = []
    for begin in range(0, candidates.numel(), rows):
        cand = candidates[slice(begin, begin + rows)].unsqueeze(1)  # [m, 1]
        width = start_bin + (begin + cand.shape[0] - 1) * stride
        pos = positions[:width]
        # Group k of candidate i holds bins j with floor(j * nbins / i) == k, i.e. the bins
        # from ceil(k * i / nbins) up to ceil((k + 1) * i / nbins).
        bounds = (group_ids * cand + nbins - 1) // nbins  # [m, nbins + 1]
        group_sum = cum_counts[bounds[:, 1:]] - cum_counts[bounds[:, :-1]]
        group_nonzero = cum_nonzero[bounds[:, 1:]] - cum_nonzero[bounds[:, :-1]]
        # Empty bins take no share; a group without counts has sum 0 and mean 0. An extra
        # zero group at index nbins serves every bin at or past the candidate.
        group_mean = torch.nn.functional.pad(group_sum / group_nonzero.clamp_min(1), (0, 1))
        group_of = torch.clamp((pos * nbins) // cand, max=nbins)  # [m, width]
        merged = torch.gather(group_mean, 1, group_of) * nonzero[:width]
        kept = cum_counts[cand]  # mass below the candidate: the merged histogram's total
        clipped = total - kept  # mass at or past the candidate, folded into bin i - 1

        p = share[:width] * (pos < cand - 1)
        p.scatter_(1, cand - 1, (bins[cand - 1] + clipped) / total)
        # scipy.special.rel_entr: x*log(x/y) for x, y > 0; 0 for x == 0; inf for x > 0, y == 0.
        terms = (p / (merged / kept)).log_().mul_(p).masked_fill_(p == 0, 0.0)
        divergence = terms.sum(dim=1)
        # No mass below the candidate: scipy divides 0 by 0 and the divergence is nan.
        divergences.append(divergence.masked_fill_(kept.squeeze(1) == 0, float("nan")))
    divergence = torch.cat(divergences)

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
