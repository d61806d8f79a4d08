"""Calibration state: export after k batches, save, load, import, continue == uninterrupted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pytorch_quantization import nn as quant_nn
from pytorch_quantization.calib import HistogramCalibrator, MaxCalibrator
from pytorch_quantization.tensor_quant import QuantDescriptor
from torch import nn

from bevfusion_ptq.errors import CalibrationError
from bevfusion_ptq.quant.amax import compute_amax
from bevfusion_ptq.quant.calib_state import (
    calibrated_quantizers,
    export_calibration_state,
    export_calibrator_state,
    import_calibration_state,
    import_calibrator_state,
)

K, SPLIT = 6, 2


def batches(shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    """Growing ranges, so the histogram adds bins after the split too."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) * (1.0 + 0.1 * i) for i in range(K)]


def roundtrip(state: object, path: Path) -> object:
    torch.save(state, path)
    return torch.load(path, weights_only=True)


def histogram_amax(calibrator: HistogramCalibrator) -> dict[str, float]:
    return {
        method: compute_amax(calibrator._calib_hist, calibrator._calib_bin_edges, method,
                             num_bits=8, unsigned=False).item()
        for method in ("mse", "percentile", "entropy")
    }


def test_histogram_calibrator_resumes_exactly(tmp_path: Path) -> None:
    data = batches((4, 8, 16, 16))
    whole = HistogramCalibrator(8, None, False)
    for x in data:
        whole.collect(x)

    first = HistogramCalibrator(8, None, False)
    for x in data[:SPLIT]:
        first.collect(x)
    state = roundtrip(export_calibrator_state(first, batches_seen=SPLIT), tmp_path / "hist.pth")
    resumed = HistogramCalibrator(8, None, False)
    assert import_calibrator_state(resumed, state) == SPLIT
    for x in data[SPLIT:]:
        resumed.collect(x)

    assert resumed._num_bins == whole._num_bins > 2048
    assert torch.equal(resumed._calib_hist, whole._calib_hist)
    assert torch.equal(resumed._calib_bin_edges, whole._calib_bin_edges)
    assert histogram_amax(resumed) == histogram_amax(whole)


@pytest.mark.parametrize("axis", [None, 0], ids=["per_tensor", "per_channel"])
def test_max_calibrator_resumes_exactly(tmp_path: Path, axis: int | None) -> None:
    data = batches((8, 3, 3, 3), seed=1)
    whole = MaxCalibrator(8, axis, False)
    for x in data:
        whole.collect(x)

    first = MaxCalibrator(8, axis, False)
    for x in data[:SPLIT]:
        first.collect(x)
    state = export_calibrator_state(first, batches_seen=SPLIT)
    first.collect(data[-1] * 100)  # the calibrator updates in place: the export must not follow
    assert state["amax"].max() < 100
    state = roundtrip(state, tmp_path / "max.pth")
    saved = state["amax"].clone()
    resumed = MaxCalibrator(8, axis, False)
    import_calibrator_state(resumed, state)
    for x in data[SPLIT:]:
        resumed.collect(x)
    assert torch.equal(resumed.compute_amax(), whole.compute_amax())
    assert torch.equal(state["amax"], saved), "import must copy, not alias, the saved running max"


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    hist = QuantDescriptor(num_bits=8, calib_method="histogram")
    weight = QuantDescriptor(num_bits=8, axis=(0,))
    return nn.Sequential(
        quant_nn.QuantConv2d(3, 8, 3, padding=1, quant_desc_input=hist, quant_desc_weight=weight),
        nn.ReLU(),
        quant_nn.QuantConv2d(8, 4, 3, padding=1, quant_desc_input=hist, quant_desc_weight=weight),
    )


def collect(model: nn.Module, inputs: list[torch.Tensor]) -> None:
    for quantizer in calibrated_quantizers(model).values():
        quantizer.disable_quant()
        quantizer.enable_calib()
    with torch.no_grad():
        for x in inputs:
            model(x)


def model_amax(model: nn.Module) -> dict[str, object]:
    result: dict[str, object] = {}
    for name, quantizer in calibrated_quantizers(model).items():
        calibrator = quantizer._calibrator
        if isinstance(calibrator, MaxCalibrator):
            result[name] = calibrator.compute_amax().tolist()
        else:
            result[name] = histogram_amax(calibrator)
    return result


def test_model_state_resumes_exactly(tmp_path: Path) -> None:
    data = batches((1, 3, 24, 24), seed=2)
    whole = small_model()
    collect(whole, data)

    first = small_model()
    collect(first, data[:SPLIT])
    state = roundtrip(export_calibration_state(first, batches_seen=SPLIT), tmp_path / "calib.pth")
    assert sorted(state) == sorted(calibrated_quantizers(first))
    assert {entry["kind"] for entry in state.values()} == {"histogram", "max"}

    resumed = small_model()
    assert import_calibration_state(resumed, state) == SPLIT
    collect(resumed, data[SPLIT:])

    for name, quantizer in calibrated_quantizers(whole).items():
        got = calibrated_quantizers(resumed)[name]._calibrator
        if isinstance(quantizer._calibrator, HistogramCalibrator):
            assert torch.equal(got._calib_hist, quantizer._calibrator._calib_hist), name
            assert torch.equal(got._calib_bin_edges, quantizer._calibrator._calib_bin_edges), name
        else:
            assert torch.equal(got._calib_amax, quantizer._calibrator._calib_amax), name
    assert model_amax(resumed) == model_amax(whole)


def test_empty_calibrators_round_trip(tmp_path: Path) -> None:
    model = small_model()
    state = roundtrip(export_calibration_state(model), tmp_path / "empty.pth")
    assert all("hist" not in e and "amax" not in e for e in state.values())
    fresh = small_model()
    collect(fresh, batches((1, 3, 8, 8))[:1])
    assert import_calibration_state(fresh, state) == 0
    assert all(
        getattr(q._calibrator, "_calib_hist", None) is None and getattr(q._calibrator, "_calib_amax", None) is None
        for q in calibrated_quantizers(fresh).values()
    )


def test_import_rejects_mismatches() -> None:
    hist = HistogramCalibrator(8, None, False)
    hist.collect(torch.randn(1000))
    hist_state = export_calibrator_state(hist, 1)
    per_channel = MaxCalibrator(8, 0, False)
    per_channel.collect(torch.randn(8, 3, 3, 3))
    max_state = export_calibrator_state(per_channel, 1)

    with pytest.raises(CalibrationError, match="'histogram' calibrator"):
        import_calibrator_state(MaxCalibrator(8, 0, False), hist_state, name="conv1._input_quantizer")
    with pytest.raises(CalibrationError, match="num_bits"):
        import_calibrator_state(HistogramCalibrator(4, None, False), hist_state)
    with pytest.raises(CalibrationError, match="bins"):
        import_calibrator_state(HistogramCalibrator(8, None, False), {**hist_state, "hist": hist_state["hist"][:-1]})
    with pytest.raises(CalibrationError, match="axis"):
        import_calibrator_state(MaxCalibrator(8, None, False), max_state)
    other = MaxCalibrator(8, 0, False)
    other.collect(torch.randn(4, 3, 3, 3))
    with pytest.raises(CalibrationError, match="shape"):
        import_calibrator_state(other, max_state)
    with pytest.raises(CalibrationError, match="lacks 'batches_seen'"):
        import_calibrator_state(MaxCalibrator(8, 0, False), {k: v for k, v in max_state.items() if k != "batches_seen"})


def test_model_import_names_unknown_and_missing_and_is_atomic() -> None:
    model = small_model()
    collect(model, batches((1, 3, 8, 8))[:1])
    state = export_calibration_state(model, batches_seen=1)
    names = sorted(state)

    renamed = {("x." + k if k == names[0] else k): v for k, v in state.items()}
    with pytest.raises(CalibrationError, match=rf"not in the model: x\.{names[0]}.*missing from the state: {names[0]}"):
        import_calibration_state(small_model(), renamed)

    mixed = {**state, names[0]: {**state[names[0]], "batches_seen": 2}}
    with pytest.raises(CalibrationError, match=r"mixes batch counts \[1, 2\]"):
        import_calibration_state(small_model(), mixed)

    # A bad entry after good ones: nothing may stay half imported.
    target = small_model()
    broken = dict(state)
    broken[names[-1]] = {**state[names[-1]], "num_bits": 4}
    with pytest.raises(CalibrationError, match=f"quantizer {names[-1]}"):
        import_calibration_state(target, broken)
    assert all(
        getattr(q._calibrator, "_calib_hist", None) is None and getattr(q._calibrator, "_calib_amax", None) is None
        for q in calibrated_quantizers(target).values()
    )


def test_batches_seen_must_be_a_count() -> None:
    with pytest.raises(CalibrationError, match="batches_seen"):
        export_calibrator_state(MaxCalibrator(8, None, False), batches_seen=-1)


@pytest.mark.gpu
def test_resume_on_cuda(tmp_path: Path) -> None:
    """Collected on the GPU, saved from the CPU copy, restored onto the GPU, continued."""
    data = [x.cuda() for x in batches((4, 8, 32, 32), seed=3)]
    whole_hist, whole_max = HistogramCalibrator(8, None, False), MaxCalibrator(8, 1, False)
    for x in data:
        whole_hist.collect(x)
        whole_max.collect(x)
    hist, runmax = HistogramCalibrator(8, None, False), MaxCalibrator(8, 1, False)
    for x in data[:SPLIT]:
        hist.collect(x)
        runmax.collect(x)
    states = roundtrip(
        {"hist": export_calibrator_state(hist, SPLIT), "max": export_calibrator_state(runmax, SPLIT)},
        tmp_path / "cuda.pth",
    )
    assert all(t.device.type == "cpu" for s in states.values() for t in s.values() if isinstance(t, torch.Tensor))
    hist, runmax = HistogramCalibrator(8, None, False), MaxCalibrator(8, 1, False)
    import_calibrator_state(hist, states["hist"], "cuda")
    import_calibrator_state(runmax, states["max"], "cuda")
    assert hist._calib_hist.is_cuda and runmax._calib_amax.is_cuda
    for x in data[SPLIT:]:
        hist.collect(x)
        runmax.collect(x)
    assert torch.equal(hist._calib_hist, whole_hist._calib_hist)
    assert torch.equal(hist._calib_bin_edges.cpu(), whole_hist._calib_bin_edges.cpu())
    assert torch.equal(runmax._calib_amax, whole_max._calib_amax)
    assert histogram_amax(hist) == histogram_amax(whole_hist)
