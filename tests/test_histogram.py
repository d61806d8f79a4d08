"""Sync-free calibrators against pytorch-quantization's own, and the collect session (CPU).

The histograms must be the library's ``torch_hist`` histograms: identical while the range
has not grown, within one bin per value after growth (see bevfusion_ptq/quant/histogram.py
for the cases), with the same bin count. The session must name non-finite activations by
quantizer and batch, redo a batch that outgrew a buffer exactly, and hand back plain
library calibrators.
"""

from __future__ import annotations

import copy
import logging
import pickle
from pathlib import Path

import pytest
import torch
from pytorch_quantization import calib

from bevfusion_ptq.errors import CalibrationError
from bevfusion_ptq.quant.amax import compute_amax
from bevfusion_ptq.quant.calib_state import export_calibration_state, import_calibration_state
from bevfusion_ptq.quant.calibrate import collect
from bevfusion_ptq.quant.compat import iter_quantizers
from bevfusion_ptq.quant.fuse import fuse_bn
from bevfusion_ptq.quant.histogram import (
    NEAR_BINS,
    SyncFreeHistogramCalibrator,
    SyncFreeMaxCalibrator,
    capacity_for,
)
from bevfusion_ptq.quant.insert import insert_quantizers
from bevfusion_ptq.quant.rules import default_rules
from tests.quant_helpers import SmallFusionNet, random_batch


def both(batches: list[torch.Tensor], num_bins: int = 2048):
    lib = calib.HistogramCalibrator(8, None, False, num_bins=num_bins)
    ours = SyncFreeHistogramCalibrator(8, None, False, num_bins=num_bins)
    for x in batches:
        lib.collect(x)
        ours.collect(x)
    return lib, ours


def assert_within_one_bin(ours: torch.Tensor, lib: torch.Tensor) -> None:
    """Every count of ``lib`` sits at most one bin away in ``ours``: the cumulative counts
    differ at a bin edge by no more than what the two bins beside that edge hold."""
    assert ours.numel() == lib.numel()
    assert float(ours.sum()) == float(lib.sum())
    a, b = ours.double().cumsum(0), lib.double().cumsum(0)
    beside = lib.double() + torch.cat([lib.double()[1:], lib.new_zeros(1, dtype=torch.float64)])
    assert bool(((a - b).abs() <= beside).all())


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_first_range_is_the_library_histogram_bit_for_bit():
    gen = generator(0)
    batches = [
        torch.relu(torch.randn(4, 16, 32, 32, generator=gen)),
        torch.randn(5000, generator=gen) * 0.9,  # negatives: both take |x|
        torch.randn(3, 7, generator=gen).double() * 0.5,
        torch.randn(64, 64, generator=gen).t()[:, ::2],  # not contiguous
    ]
    lib, ours = both(batches)
    assert ours._num_bins == lib._num_bins == 2048
    assert torch.equal(ours._calib_hist, lib._calib_hist)
    assert torch.equal(ours._calib_bin_edges, lib._calib_bin_edges)


@pytest.mark.parametrize("scales", [(1.0, 1.7, 2.6), (1.0, 0.5, 3.9, 1.2)], ids=["growing", "mixed"])
def test_grown_histogram_within_one_bin_and_same_amax(scales):
    gen = generator(1)
    batches = [torch.randn(20000, generator=gen) * s for s in scales]
    lib, ours = both(batches)
    assert ours._num_bins == lib._num_bins > 2048
    assert torch.equal(ours._calib_bin_edges, lib._calib_bin_edges)
    assert_within_one_bin(ours._calib_hist, lib._calib_hist)
    width = float(lib._calib_bin_edges[1])
    for method in ("mse", "percentile", "entropy"):
        mine = compute_amax(ours._calib_hist, ours._calib_bin_edges, method, num_bits=8, unsigned=False)
        theirs = compute_amax(lib._calib_hist, lib._calib_bin_edges, method, num_bits=8, unsigned=False)
        assert abs(float(mine) - float(theirs)) <= width, method


def test_range_grown_past_the_shared_memory_bins_uses_the_far_bins():
    gen = generator(2)
    batches = [torch.rand(30000, generator=gen), torch.rand(30000, generator=gen) * 31.0]
    lib, ours = both(batches)
    assert ours._num_bins == lib._num_bins > NEAR_BINS
    assert_within_one_bin(ours._calib_hist, lib._calib_hist)


def test_exact_values_on_the_far_bins_edge():
    """Bin width 1 and integer or half-integer data: every quotient is exact, so the counts
    must be the library's exactly, values on the near/far boundary (8192) included."""
    first = torch.arange(0, 2049, dtype=torch.float32)  # max 2048: width 1
    values = torch.tensor([8191.0, 8191.5, 8192.0, 8192.0, 8192.5, 8193.0, 12345.0, 19999.5, 20000.0])
    lib, ours = both([first, torch.cat([values, torch.arange(0, 20000, 7, dtype=torch.float32)])])
    assert ours._num_bins == lib._num_bins == 20000
    assert ours._capacity == capacity_for(20000) > NEAR_BINS
    assert torch.equal(ours._calib_hist, lib._calib_hist)
    assert float(ours._calib_hist[8192]) == 3.0  # 8192, 8192, 8192.5


def test_half_precision_input_is_counted_as_float():
    gen = generator(3)
    x = torch.randn(4096, generator=gen).half()
    lib, ours = both([x, x * 1.5])
    assert_within_one_bin(ours._calib_hist, lib._calib_hist)


def test_empty_tensor_is_skipped():
    ours = SyncFreeHistogramCalibrator(8, None, False)
    ours.collect(torch.empty(0))
    assert ours._calib_hist is None
    ours.collect(torch.ones(10))
    ours.collect(torch.empty(0, 3))
    assert float(ours._calib_hist.sum()) == 10


def test_library_attributes_export_import_and_continue_exactly():
    """Import through the library's attributes (as calib_state does), then collect on."""
    gen = generator(4)
    batches = [torch.randn(10000, generator=gen) * (1 + 0.4 * i) for i in range(5)]
    _, whole = both(batches)
    first = SyncFreeHistogramCalibrator(8, None, False)
    for x in batches[:2]:
        first.collect(x)
    resumed = SyncFreeHistogramCalibrator(8, None, False)
    resumed._calib_hist = first._calib_hist.clone()
    resumed._calib_bin_edges = first._calib_bin_edges.clone()
    resumed._num_bins = first._num_bins
    for x in batches[2:]:
        resumed.collect(x)
    assert torch.equal(resumed._calib_hist, whole._calib_hist)
    assert torch.equal(resumed._calib_bin_edges, whole._calib_bin_edges)


def test_reset_starts_over():
    gen = generator(5)
    x = torch.randn(5000, generator=gen)
    ours = SyncFreeHistogramCalibrator(8, None, False)
    ours.collect(x * 7)
    ours.reset()
    ours.collect(x)
    lib, _ = both([x])
    assert torch.equal(ours._calib_hist, lib._calib_hist)


@pytest.mark.parametrize("axis", [None, 0, (0,)], ids=["per_tensor", "per_channel", "per_channel_tuple"])
def test_max_calibrator_matches_the_library(axis):
    gen = generator(6)
    data = [torch.randn(8, 3, 3, 3, generator=gen) * (1 + i) for i in range(3)]
    lib, ours = calib.MaxCalibrator(8, axis, False), SyncFreeMaxCalibrator(8, axis, False)
    for x in data:
        lib.collect(x)
        ours.collect(x)
    assert torch.equal(ours.compute_amax(), lib.compute_amax())


def test_max_calibrator_skips_a_weight_it_has_seen_until_it_changes():
    weight = torch.nn.Parameter(torch.randn(4, 2, 3, 3, generator=generator(7)))
    ours = SyncFreeMaxCalibrator(8, 0, False)
    ours.collect(weight)
    first = ours.compute_amax().clone()
    reduced = []
    original = ours._calib_amax.copy_
    ours._calib_amax.copy_ = lambda *a, **k: reduced.append(1) or original(*a, **k)  # noqa: E731
    ours.collect(weight)
    assert not reduced and torch.equal(ours.compute_amax(), first)
    with torch.no_grad():
        weight.mul_(3.0)  # in place: the version counter moves
    ours.collect(weight)
    torch.testing.assert_close(ours.compute_amax(), first * 3.0)


# ------------------------------------------------------------------------- the session
def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = SmallFusionNet().eval()
    insert_quantizers(model, default_rules(()))
    fuse_bn(model)
    return model


def scaled(seed: int, scale: float) -> dict:
    batch = random_batch(seed)
    batch["img"] = batch["img"] * scale
    batch["features"] = batch["features"] * scale
    return batch


def histograms(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        n: (q._calibrator._calib_hist, q._calibrator._calib_bin_edges)
        for n, q in iter_quantizers(model)
        if isinstance(q._calibrator, calib.HistogramCalibrator)
    }


def library_collect(model: torch.nn.Module, batches: list[dict]) -> None:
    """pytorch-quantization's calibrators, as they come, on the same forward."""
    for _, q in iter_quantizers(model):
        q.disable_quant()
        q.enable_calib()
    with torch.no_grad():
        for batch in batches:
            model(batch)


def standalone_collect(model: torch.nn.Module, batches: list[dict]) -> None:
    """Our calibrators without a session: each call sizes its buffer itself."""
    for _, q in iter_quantizers(model):
        cal = q._calibrator
        kind = SyncFreeHistogramCalibrator if isinstance(cal, calib.HistogramCalibrator) else SyncFreeMaxCalibrator
        q._calibrator = kind.from_calibrator(cal)
    library_collect(model, batches)


def test_collect_hands_back_library_calibrators_within_one_bin_of_the_library():
    batches = [scaled(i, 1.0 + 0.5 * i) for i in range(4)]
    ours, lib = small_model(), small_model()
    collect(ours, batches, 4, forward=lambda m, b: m(b))
    library_collect(lib, batches)
    for _, q in iter_quantizers(ours):
        assert type(q._calibrator) in (calib.HistogramCalibrator, calib.MaxCalibrator)
    pickle.dumps(ours)  # the saved model holds only library objects
    theirs = histograms(lib)
    for name, (hist, edges) in histograms(ours).items():
        assert_within_one_bin(hist, theirs[name][0])
        assert edges.numel() == theirs[name][1].numel(), name
    lib_q = dict(iter_quantizers(lib))
    for name, q in iter_quantizers(ours):
        if isinstance(q._calibrator, calib.MaxCalibrator):
            assert torch.equal(q._calibrator._calib_amax, lib_q[name]._calibrator._calib_amax), name


def test_collect_switches_quantizers_without_a_log_record_each(caplog: pytest.LogCaptureFixture):
    """TensorQuantizer's enable/disable methods log once per call through absl (a warning for
    each disable_calib): hundreds of lines per calibration from a plain script, and host time
    on every collect. collect sets the flags itself and leaves every quantizer quantizing."""
    model = small_model()
    with caplog.at_level(logging.DEBUG, logger="absl"):
        collect(model, [scaled(0, 1.0)], 1, forward=lambda m, b: m(b))
    assert [r.getMessage() for r in caplog.records if r.name == "absl"] == []
    calibrated = [q for _, q in iter_quantizers(model) if q._calibrator is not None]
    assert calibrated and all(q._if_quant and not q._if_calib for q in calibrated)


def test_batch_that_outgrows_a_buffer_is_redone_exactly():
    batches = [scaled(0, 1.0), scaled(1, 60.0), scaled(2, 1.0)]  # batch 1: ranges grow ~60x
    calls = []

    def forward(model, batch):
        calls.append(1)
        return model(batch)

    ours, alone = small_model(), small_model()
    collect(ours, batches, 3, forward=forward)
    standalone_collect(alone, batches)
    assert len(calls) == 4  # batch 1 twice, for the histograms that outgrew their buffers
    expected = histograms(alone)
    for name, (hist, edges) in histograms(ours).items():
        assert hist.numel() > NEAR_BINS or name.startswith("lidar"), name
        assert torch.equal(hist, expected[name][0]), name
        assert torch.equal(edges, expected[name][1]), name


def test_non_finite_activation_names_the_first_quantizer_and_batch_before_progress():
    batches = [scaled(i, 1.0) for i in range(4)]
    batches[2]["features"][3, 1] = float("inf")
    seen = []
    with pytest.raises(CalibrationError, match=r"quantizer lidar\.0\._input_quantizer in calibration batch 2"):
        collect(small_model(), batches, 4, forward=lambda m, b: m(b), progress=lambda s, n: seen.append(s))
    assert seen == [1, 2]  # the poisoned batch never reached progress (the checkpoint hook)


def test_all_zero_first_tensor_fails_naming_the_quantizer():
    batches = [scaled(0, 0.0), scaled(1, 1.0)]
    with pytest.raises(CalibrationError, match=r"camera\.0\._input_quantizer saw only zeros .*batch 0"):
        collect(small_model(), batches, 2, forward=lambda m, b: m(b))


def test_state_exported_mid_collection_resumes_exactly(tmp_path: Path):
    batches = [scaled(i, 1.0 + 0.7 * i) for i in range(5)]
    whole = small_model()
    collect(whole, batches, 5, forward=lambda m, b: m(b))

    first, path = small_model(), tmp_path / "state.pt"

    def checkpoint(seen: int, total: int) -> None:
        if seen == 2:
            torch.save(export_calibration_state(first, seen), path)

    collect(first, batches, 5, forward=lambda m, b: m(b), progress=checkpoint)
    resumed = small_model()
    start = import_calibration_state(resumed, torch.load(path, weights_only=True))
    assert start == 2
    collect(resumed, batches[start:], 5, forward=lambda m, b: m(b), start=start)
    expected = histograms(whole)
    for name, (hist, edges) in histograms(resumed).items():
        assert torch.equal(hist, expected[name][0]), name
        assert torch.equal(edges, expected[name][1]), name


def test_session_leaves_a_copy_of_the_model_untouched():
    model = small_model()
    twin = copy.deepcopy(model)
    collect(model, [scaled(0, 1.0)], 1, forward=lambda m, b: m(b))
    assert all(q._calibrator._calib_hist is None for _, q in iter_quantizers(twin)
               if isinstance(q._calibrator, calib.HistogramCalibrator))


def kernel_inputs() -> list[torch.Tensor]:
    gen = generator(0)
    return [
        torch.relu(torch.randn(300_001, generator=gen)),  # many zeros, a length not a multiple of 4
        torch.randn(200_000, generator=gen) * 2.5,  # grows the range
        torch.tensor([0.0, 1.0, 4096.0 * 2.5]),  # a value on the new top edge
        torch.randn(500_000, generator=gen) * 40,  # grows past the shared-memory bins
        torch.randn(64, 1000, generator=gen)[:, 1:-3],  # a strided view
        torch.randn(100_001, generator=gen)[1:],  # contiguous, but not 16-byte aligned
    ]


def test_kernel_path_is_for_cuda_only(monkeypatch: pytest.MonkeyPatch):
    from bevfusion_ptq.quant import histogram as H

    assert not H.kernels_available(torch.device("cpu"))
    if torch.cuda.is_available():
        monkeypatch.setenv(H.BACKEND_ENV, "torch")
        assert not H.kernels_available(torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("num_bins", [2048, 1000])
def test_cuda_kernels_count_exactly_like_the_torch_ops(monkeypatch: pytest.MonkeyPatch, num_bins: int):
    """count_bins.cu (compiled by NVRTC) against the torch-op path, on the same CUDA tensors:
    the first range (``first_range``, also for a bin count that is not a power of two, whose
    reciprocal rounds) and every count after it."""
    from bevfusion_ptq.quant import histogram as H

    device = torch.device("cuda")
    assert H.kernels_available(device)
    data = [x.to(device) for x in kernel_inputs()]
    results = {}
    for backend in ("torch", "kernels"):
        monkeypatch.setenv(H.BACKEND_ENV, "torch" if backend == "torch" else "")
        cal = SyncFreeHistogramCalibrator(8, None, False, num_bins=num_bins)
        cal.collect(data[0])
        first = cal._scalars[:2].tolist()
        for x in data[1:]:
            cal.collect(x)
        results[backend] = (cal._num_bins, cal._calib_hist.cpu(), cal._calib_bin_edges.cpu(), first)
    assert results["kernels"][3] == results["torch"][3]
    assert results["kernels"][0] == results["torch"][0] > NEAR_BINS
    assert torch.equal(results["kernels"][1], results["torch"][1])
    assert torch.equal(results["kernels"][2], results["torch"][2])
    if num_bins == H.DEFAULT_BINS:  # the library's own histogram, as the CPU tests compare it
        lib = calib.HistogramCalibrator(8, None, False)
        for x in data:
            lib.collect(x)
        assert_within_one_bin(results["kernels"][1], lib._calib_hist.cpu())

    bad = SyncFreeHistogramCalibrator(8, None, False)
    bad.collect(torch.tensor([1.0, 2.0], device=device))
    bad.collect(torch.tensor([1.0, float("nan")], device=device))
    assert torch.isnan(bad._nb)
    for first_tensor in ([1.0, float("nan"), 3.0], [0.0, 0.0], [float("-inf"), 1.0]):  # no usable range
        bad = SyncFreeHistogramCalibrator(8, None, False)
        bad.collect(torch.tensor(first_tensor, device=device))
        assert torch.isnan(bad._nb)


class _TwiceQuantized(torch.nn.Module):
    """One histogram quantizer called on two tensors per batch, as a residual add does."""

    def __init__(self) -> None:
        super().__init__()
        from pytorch_quantization.nn import TensorQuantizer
        from pytorch_quantization.tensor_quant import QuantDescriptor

        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device
        self.q = TensorQuantizer(QuantDescriptor(num_bits=8, calib_method="histogram"))

    def forward(self, batch: dict) -> None:
        self.q(batch["small"])
        self.q(batch["large"])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("growth, forwards", [(40.0, 2), (300.0, 3)])
def test_growth_within_the_first_batch_needs_no_sync_and_stays_exact(device: str, growth: float, forwards: int):
    """One quantizer sees a range grow within the first batch (a residual add's conv output,
    then its identity). In a session its repeated call makes room for FIRST_BATCH_GROWTH-fold
    growth without a sync: 40-fold fits and no batch is redone; 300-fold does not, and the
    batch is redone once. Either way the counts are those of a calibrator used alone, which
    sizes its buffer with a sync before every call."""
    from bevfusion_ptq.quant import histogram as H

    assert 40.0 < H.FIRST_BATCH_GROWTH < 300.0 / 2  # capacity_for leaves up to 2x slack
    gen = torch.Generator().manual_seed(4)
    batches = [{"small": torch.randn(50_000, generator=gen).to(device),
                "large": (torch.randn(50_000, generator=gen) * s).to(device)} for s in (growth, 1.0)]
    model = _TwiceQuantized().to(device)
    calls = []

    def forward(m: torch.nn.Module, batch: dict) -> None:
        calls.append(1)
        m(batch)

    collect(model, batches, 2, forward=forward)
    session = model.q._calibrator
    alone = SyncFreeHistogramCalibrator(8, None, False)
    for batch in batches:
        alone.collect(batch["small"])
        alone.collect(batch["large"])
    assert len(calls) == forwards
    assert session._num_bins == alone._num_bins > growth / 2 * H.DEFAULT_BINS
    assert torch.equal(session._calib_hist.cpu(), alone._calib_hist.cpu())
    assert torch.equal(session._calib_bin_edges.cpu(), alone._calib_bin_edges.cpu())
