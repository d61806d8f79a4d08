"""Histogram amax (MSE, entropy, percentile) against pytorch-quantization's own functions.

The library's MSE search calls ``.cuda()``; here it runs on the CPU through a test-only shim
that makes ``Tensor.cuda`` the identity while the reference runs. Its entropy search is a
Python loop that takes about a minute on a 2048-bin histogram, so the equality cases use a
few hundred bins (or a stride) to keep this file fast; the vectorised code has no such limit.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from pytorch_quantization.calib import HistogramCalibrator
from pytorch_quantization.calib.histogram import (
    _compute_amax_entropy,
    _compute_amax_mse,
    _compute_amax_percentile,
)

from bevfusion_ptq.errors import CalibrationError
from bevfusion_ptq.quant.amax import (
    DEFAULT_CHUNK_ELEMENTS,
    _entropy_divergences,
    _EntropyTables,
    _mse_errors,
    compute_amax,
    entropy_amax,
    mse_amax,
    percentile_amax,
)


@contextlib.contextmanager
def cuda_is_cpu() -> Iterator[None]:
    """Let the reference's unconditional ``.cuda()`` be a no-op, for as long as it runs."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def collected(num_bins: int, batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A histogram made the way calibration makes it: torch_hist, bins growing with the max."""
    calibrator = HistogramCalibrator(8, None, False, num_bins=num_bins)
    for x in batches:
        calibrator.collect(x)
    return calibrator._calib_hist, calibrator._calib_bin_edges


def from_counts(counts: np.ndarray, top: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 histogram with the given counts over [0, top], like histc makes."""
    hist = torch.from_numpy(counts.astype(np.float32))
    edges = torch.linspace(0, top, counts.size + 1)
    return hist, edges


def histograms(num_bins: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Varied histograms of about ``num_bins`` bins, deterministic."""
    torch.manual_seed(0)  # StudentT samples from the global generator
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    n = num_bins
    cases = {
        "normal": collected(n, [torch.randn(20000, generator=gen) for _ in range(3)]),
        # Later batches exceed the first max: the histogram grows past num_bins.
        "growing": collected(n, [torch.randn(20000, generator=gen) * s for s in (1.0, 1.7, 2.6)]),
        "heavy_tailed": collected(n, [torch.distributions.StudentT(1.5).sample((30000,)) for _ in range(2)]),
        "relu": collected(n, [torch.relu(torch.randn(30000, generator=gen) - 0.5) for _ in range(2)]),
        "sparse": from_counts(rng.integers(1, 50, n) * (rng.random(n) < 0.15)),
        "spikes": from_counts(np.bincount(rng.integers(0, n, 12), weights=rng.integers(1, 1000, 12), minlength=n)),
        "flat": from_counts(np.full(n, 7)),
        "mass_at_top": from_counts(np.concatenate([np.zeros(n - 40, np.int64), rng.integers(0, 100, 40)])),
        # Every candidate amax below 2**-24: the library quantizes everything to zero.
        "tiny_range": from_counts(rng.integers(0, 100, n), top=1e-8),
        "single_value": collected(n, [torch.full((1000,), 0.75)]),
    }
    return cases


def reference_inputs(hist: torch.Tensor, edges: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """What ``HistogramCalibrator.compute_amax`` hands its helper functions."""
    return hist.int().cpu().numpy(), edges.cpu().numpy()


def bin_of(edges: torch.Tensor, value: torch.Tensor) -> int:
    return int(torch.searchsorted(edges.float(), value.float().reshape(1), right=True)[0]) - 1


VARIANTS = [
    dict(num_bits=8, unsigned=False, start_bin=128, stride=1),
    dict(num_bits=8, unsigned=True, start_bin=128, stride=1),
    dict(num_bits=6, unsigned=False, start_bin=40, stride=3),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "b{num_bits}{u}-s{start_bin}/{stride}".format(
    u="u" if v["unsigned"] else "", **v))
def test_mse_matches_pytorch_quantization(variant: dict) -> None:
    differ = []
    for name, (hist, edges) in histograms(700).items():
        calib_hist, calib_edges = reference_inputs(hist, edges)
        with cuda_is_cpu():
            theirs = _compute_amax_mse(calib_hist, calib_edges, variant["num_bits"], variant["unsigned"],
                                       variant["stride"], variant["start_bin"])
        ours = mse_amax(hist, edges, **variant)
        assert ours.dtype == torch.float32 and ours.dim() == 0 and ours.device == hist.device
        if ours.item() != theirs.item():
            differ.append(f"{name}: ours {ours.item()} (bin {bin_of(edges, ours)}), "
                          f"theirs {theirs.item()} (bin {bin_of(edges, theirs)})")
    assert not differ, "\n".join(differ)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "b{num_bits}{u}-s{start_bin}/{stride}".format(
    u="u" if v["unsigned"] else "", **v))
def test_entropy_matches_pytorch_quantization(variant: dict) -> None:
    differ = []
    for name, (hist, edges) in histograms(300).items():
        calib_hist, calib_edges = reference_inputs(hist, edges)
        theirs = _compute_amax_entropy(calib_hist, calib_edges, variant["num_bits"], variant["unsigned"],
                                       variant["stride"], variant["start_bin"])
        before = hist.clone()
        ours = entropy_amax(hist, edges, **variant)
        assert torch.equal(hist, before), "the caller's histogram must not change"
        assert ours.dtype == torch.float32 and ours.dim() == 0
        if ours.item() != theirs.item():
            differ.append(f"{name}: ours {ours.item()} (edge {bin_of(edges, ours)}), "
                          f"theirs {theirs.item()} (edge {bin_of(edges, theirs)})")
    assert not differ, "\n".join(differ)


def test_entropy_matches_on_full_size_histogram_with_stride() -> None:
    """2048+ bins as calibration makes them; a stride keeps the reference's loop short."""
    gen = torch.Generator().manual_seed(3)
    hist, edges = collected(2048, [torch.randn(50000, generator=gen) * s for s in (1.0, 1.3)])
    assert hist.numel() > 2048
    theirs = _compute_amax_entropy(*reference_inputs(hist, edges), 8, False, 37, 128)
    assert entropy_amax(hist, edges, stride=37).item() == theirs.item()


def _full_search(hist: torch.Tensor, edges: torch.Tensor) -> tuple[float, float]:
    """MSE and entropy amax from every candidate's exact row: the arithmetic without the screen."""
    centers = (edges[1:] + edges[:-1]) / 2
    mse_candidates = torch.arange(128, centers.numel())
    errors = _mse_errors(centers, hist.float(), mse_candidates, 8, False, DEFAULT_CHUNK_ELEMENTS)
    mse = centers[mse_candidates[int(torch.nonzero(errors == errors.min())[0])]]
    tables = _EntropyTables(hist, 8, False)
    entropy_candidates = torch.arange(128, hist.numel() + 1)
    divergence = _entropy_divergences(tables, entropy_candidates, DEFAULT_CHUNK_ELEMENTS)
    entropy = edges[int(entropy_candidates[int(torch.nonzero(divergence == divergence.min())[-1])])]
    return mse.item(), entropy.item()


@pytest.mark.parametrize("shape", ["normal", "relu", "heavy_tailed", "laplace"])
def test_screen_keeps_the_exact_answer_on_grown_histograms(shape: str) -> None:
    """Histograms that grew to ~10-15k bins, as wide-range activations make them: the closed-form
    screen plus exact rows picks what the exact rows of all candidates pick."""
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(1)
    draw = {
        "normal": lambda: torch.randn(100_000, generator=gen),
        "relu": lambda: torch.relu(torch.randn(100_000, generator=gen) - 0.5),
        # Clamped, so that both batches reach their bound and the histogram grows exactly 7-fold.
        "heavy_tailed": lambda: torch.distributions.StudentT(1.5).sample((100_000,)).clamp(-50.0, 50.0),
        "laplace": lambda: torch.distributions.Laplace(0.0, 1.0).sample((100_000,)),
    }[shape]
    hist, edges = collected(2048, [draw() * s for s in (1.0, 7.0)])
    assert 4 * 2048 < hist.numel() < 10 * 2048  # grown, yet small enough for the exact search of all
    mse, entropy = _full_search(hist, edges)
    assert mse_amax(hist, edges).item() == mse
    assert entropy_amax(hist, edges).item() == entropy


def test_percentile_matches_pytorch_quantization() -> None:
    for name, (hist, edges) in histograms(700).items():
        for percentile in (0.0, 50.0, 99.0, 99.99, 99.999, 100.0):
            theirs = _compute_amax_percentile(*reference_inputs(hist, edges), percentile)
            ours = percentile_amax(hist, edges, percentile)
            assert ours.item() == theirs.item(), (name, percentile)


def test_calibrator_compute_amax_is_reproduced() -> None:
    """Through the library's own entry point, as the reference pipeline calls it."""
    gen = torch.Generator().manual_seed(5)
    calibrator = HistogramCalibrator(8, None, False, num_bins=400)
    for scale in (1.0, 2.0, 0.5):
        calibrator.collect(torch.randn(4, 16, 32, 32, generator=gen) * scale)
    for method, kwargs in (("mse", {}), ("entropy", {}), ("percentile", {"percentile": 99.9})):
        with cuda_is_cpu():
            theirs = calibrator.compute_amax(method, **kwargs)
        ours = compute_amax(calibrator._calib_hist, calibrator._calib_bin_edges, method,
                            num_bits=8, unsigned=False, **kwargs)
        assert ours.item() == theirs.item(), method


def test_surplus_bin_edges_from_the_growth_step() -> None:
    """The library's growth can leave len(edges) == len(hist) + 2; its MSE then fails."""
    hist, edges = histograms(300)["growing"]
    width = edges[1] - edges[0]
    longer = torch.cat([edges, edges[-1:] + width])
    calib_hist, calib_edges = reference_inputs(hist, longer)
    with cuda_is_cpu(), pytest.raises(RuntimeError):
        _compute_amax_mse(calib_hist, calib_edges, 8, False, 1, 128)
    assert mse_amax(hist, longer) == mse_amax(hist, edges)
    assert entropy_amax(hist, longer).item() == _compute_amax_entropy(calib_hist, calib_edges, 8, False, 1, 128).item()
    assert percentile_amax(hist, longer).item() == _compute_amax_percentile(calib_hist, calib_edges, 99.99).item()


def test_chunking_does_not_change_the_answer() -> None:
    hist, edges = histograms(700)["heavy_tailed"]
    n = hist.numel()
    for rows in (1, 7, 100):
        assert mse_amax(hist[:200], edges[:201], chunk_elements=rows * 200) == mse_amax(hist[:200], edges[:201])
        assert mse_amax(hist, edges, chunk_elements=rows * n) == mse_amax(hist, edges)
        assert entropy_amax(hist, edges, chunk_elements=rows * n) == entropy_amax(hist, edges)


def test_dispatcher_contract() -> None:
    hist, edges = histograms(300)["normal"]
    assert compute_amax(None, None, "mse", num_bits=8, unsigned=False) is None
    with pytest.raises(ValueError, match="mse, entropy, percentile"):
        compute_amax(hist, edges, "max", num_bits=8, unsigned=False)
    with pytest.raises(CalibrationError, match="start_bin"):
        compute_amax(hist[:100], edges[:101], "mse", num_bits=8, unsigned=False)
    with pytest.raises(CalibrationError, match="bin edges"):
        compute_amax(hist, edges[:-1], "entropy", num_bits=8, unsigned=False)
    with pytest.raises(CalibrationError, match="non-finite"):
        compute_amax(hist, edges * float("nan"), "mse", num_bits=8, unsigned=False)
    with pytest.raises(ValueError, match="percentile"):
        compute_amax(hist, edges, "percentile", num_bits=8, unsigned=False, percentile=101.0)


def _best_of(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def test_timing_2048_bins(capsys: pytest.CaptureFixture[str]) -> None:
    """Printed, not asserted: CI machines vary too much for a speed threshold."""
    gen = torch.Generator().manual_seed(7)
    hist, edges = collected(2048, [torch.randn(100000, generator=gen)])
    calib_hist, calib_edges = reference_inputs(hist, edges)

    def theirs_mse() -> object:
        with cuda_is_cpu():
            return _compute_amax_mse(calib_hist, calib_edges, 8, False, 1, 128)

    stride = 64
    # One thread for both: on a busy 2-core runner OpenMP barriers make multithreaded small
    # ops erratic, and the library's loop is dominated by per-candidate overhead anyway.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t_mse_theirs = _best_of(theirs_mse, 1)
        t_mse_ours = _best_of(lambda: mse_amax(hist, edges), 3)
        t_ent_theirs = _best_of(
            lambda: _compute_amax_entropy(calib_hist.copy(), calib_edges, 8, False, stride, 128), 1
        )
        t_ent_ours = _best_of(lambda: entropy_amax(hist, edges), 3)
    finally:
        torch.set_num_threads(threads)
    # The reference's cost grows with the candidates it visits; scale its strided run up.
    candidates = len(range(128, 2048 + 1))
    t_ent_theirs_full = t_ent_theirs * candidates / len(range(128, 2048 + 1, stride))
    with capsys.disabled():
        print(
            f"\n[amax timing, CPU, torch {torch.__version__}, 1 thread, 2048 bins]\n"
            f"  mse:     pytorch-quantization {t_mse_theirs * 1e3:8.1f} ms, ours {t_mse_ours * 1e3:7.1f} ms, "
            f"x{t_mse_theirs / t_mse_ours:.0f}\n"
            f"  entropy: pytorch-quantization {t_ent_theirs_full * 1e3:8.1f} ms (stride {stride} run of "
            f"{t_ent_theirs * 1e3:.0f} ms scaled to all {candidates} candidates), ours {t_ent_ours * 1e3:7.1f} ms "
            f"(all candidates), x{t_ent_theirs_full / t_ent_ours:.0f}"
        )


@pytest.mark.gpu
def test_cuda_matches_reference_on_cuda() -> None:
    """On a GPU the reference runs as written (no shim); ours runs on the histogram's device."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    calibrator = HistogramCalibrator(8, None, False, num_bins=2048)
    for scale in (1.0, 1.5, 3.0):
        calibrator.collect(torch.randn(8, 64, 64, 64, device="cuda", generator=gen) * scale)
    hist, edges = calibrator._calib_hist, calibrator._calib_bin_edges
    theirs = calibrator.compute_amax("mse")
    ours = compute_amax(hist, edges, "mse", num_bits=8, unsigned=False)
    assert ours.device.type == "cuda"
    assert ours.item() == theirs.item()
    assert compute_amax(hist, edges, "entropy", num_bits=8, unsigned=False).device.type == "cuda"
