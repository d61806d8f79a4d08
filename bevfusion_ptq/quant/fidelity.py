"""How far the INT8 (fake-quant) model drifts from its own FP32 self, stage by stage.

Calibration statistics say nothing about whether the quantized network still computes the
same thing. This report runs each batch twice through the *same* model object: once with
every quantizer passing its input through (FP32 reference), once as calibrated (INT8
fake-quant), and compares the outputs at each stage boundary and in the decoded boxes.
Using one model for both passes means no second copy of the weights on the GPU and no
chance of comparing against a differently fused or loaded reference.

Metrics, per batch and per stage (``q`` INT8, ``f`` FP32, whole batch tensor flattened, in
float64):

- cosine similarity ``<q, f> / (||q|| ||f||)``: direction, blind to a global scale error;
- relative L2 error ``||q - f|| / ||f||``: catches scale errors that cosine misses.

Both are reported as mean and worst (lowest cosine, highest error) over the batches.

Decoded boxes (see :func:`match_boxes`): the share of the FP32 model's top-k boxes (by
score) that the INT8 model also finds, with the same class and a BEV centre within
``match_distance`` metres.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from pytorch_quantization.nn import TensorQuantizer
from torch import Tensor, nn

from bevfusion_ptq.data.batch import move_batch
from bevfusion_ptq.errors import CalibrationError
from bevfusion_ptq.quant import compat

log = logging.getLogger(__name__)

#: BEVFusion's stage boundaries, in data-flow order (keys of :func:`bevfusion_forward`)
STAGES: tuple[str, ...] = ("camera_bev", "lidar_bev", "fused_bev", "decoder_out", "heatmap")
STAGE_TITLES: dict[str, str] = {
    "camera_bev": "camera BEV",
    "lidar_bev": "lidar BEV",
    "fused_bev": "fused BEV",
    "decoder_out": "decoder output",
    "heatmap": "head heatmap (logits)",
}
#: the key under which a forward function returns decoded boxes (not a stage tensor)
BOXES_KEY = "boxes"
#: quantizer flags the report changes and puts back exactly as they were
_FLAGS: tuple[str, ...] = ("_disabled", "_if_quant", "_if_calib", "_if_clip")

Forward = Callable[[nn.Module, Any], Mapping[str, Any]]


class FidelityError(CalibrationError):
    """The fidelity report cannot be computed: too few batches, no or uncalibrated quantizers,
    non-finite outputs, or FP32 and INT8 passes that return different things."""


# ---------------------------------------------------------------------------- forward
def bevfusion_forward(model: nn.Module, batch: Any) -> dict[str, Any]:
    """One full BEVFusion forward: the four feature stages, the dense heatmap and the boxes.

    The heatmap is the head's dense class heatmap (logits, ``[B, classes, X, Y]``): it is
    what picks the object queries, so drift there moves or drops detections. A model whose
    output is a plain tensor is reported as a single stage ``output``.
    """
    batch = move_batch(batch, compat.model_device(model))
    out = model(batch)
    if isinstance(out, Tensor):
        return {"output": out}
    result = {k: v for k, v in out.items() if isinstance(v, Tensor)}
    preds = out.get("preds")
    if isinstance(preds, Mapping) and "dense_heatmap" in preds:
        result["heatmap"] = preds["dense_heatmap"]
    if BOXES_KEY in out:
        result[BOXES_KEY] = out[BOXES_KEY]
    return result


# ---------------------------------------------------------------------------- metrics
def compare_tensors(q: Tensor, f: Tensor) -> tuple[float, float]:
    """(cosine similarity, relative L2 error) of ``q`` against the reference ``f``.

    Computed in float64 on the flattened tensors, so that identical tensors give exactly
    (1, 0) and large maps do not lose precision in the sums. A zero reference gives a
    relative error of 0 when ``q`` is zero too and ``inf`` otherwise.
    """
    if q.shape != f.shape:
        raise FidelityError(f"INT8 output shape {tuple(q.shape)} differs from FP32 {tuple(f.shape)}")
    if torch.equal(q, f):
        return 1.0, 0.0
    q64 = q.detach().double().flatten()
    f64 = f.detach().double().flatten()
    ss_q = float(q64.dot(q64))
    ss_f = float(f64.dot(f64))
    if ss_q == 0.0 and ss_f == 0.0:
        cosine = 1.0
    elif ss_q == 0.0 or ss_f == 0.0:
        cosine = 0.0
    else:
        cosine = max(-1.0, min(1.0, float(q64.dot(f64)) / math.sqrt(ss_q * ss_f)))
    diff = q64 - f64
    ss_d = float(diff.dot(diff))
    rel_l2 = math.sqrt(ss_d / ss_f) if ss_f > 0.0 else (0.0 if ss_d == 0.0 else math.inf)
    return cosine, rel_l2


def _top_k(boxes: Mapping[str, Tensor], k: int) -> tuple[Tensor, Tensor]:
    """(BEV centres ``[K, 2]``, labels ``[K]``) of the ``k`` highest-scoring boxes.

    A stable sort keeps the decoder's order among equal scores, so ties resolve the same
    way in both passes.
    """
    order = torch.sort(boxes["score"].detach().float(), descending=True, stable=True).indices[:k]
    return boxes["center"][order, :2].detach().double().cpu(), boxes["label"][order].detach().cpu()


def match_boxes(
    fp32: Mapping[str, Tensor], int8: Mapping[str, Tensor], *, top_k: int = 100, match_distance: float = 0.5
) -> tuple[int, int]:
    """(matched, considered): how many of the FP32 top-k boxes the INT8 model reproduces.

    Definition: take the ``top_k`` highest-scoring boxes of each pass for one sample. Walk
    the FP32 boxes from highest to lowest score; each is matched to the nearest INT8 box
    that (a) has the same label, (b) has a BEV centre (x, y) strictly closer than
    ``match_distance`` metres, and (c) is not yet matched to a higher-scoring FP32 box
    (greedy one-to-one). ``considered`` is the number of FP32 boxes taken (at most
    ``top_k``). Scores, sizes and yaw are not compared: the question is whether the same
    objects are detected, which is what a box-level mAP drop would come from.
    """
    f_xy, f_label = _top_k(fp32, top_k)
    q_xy, q_label = _top_k(int8, top_k)
    if len(f_xy) == 0 or len(q_xy) == 0:
        return 0, len(f_xy)
    dist = torch.cdist(f_xy, q_xy)
    dist[f_label[:, None] != q_label[None, :]] = math.inf
    taken = torch.zeros(len(q_xy), dtype=torch.bool)
    matched = 0
    for row in dist:
        row = row.masked_fill(taken, math.inf)
        j = int(row.argmin())
        if float(row[j]) < match_distance:
            taken[j] = True
            matched += 1
    return matched, len(f_xy)


# ---------------------------------------------------------------------------- report
def _finite_or_none(x: float | None) -> float | None:
    """JSON has no inf/NaN: such values are written as null."""
    return x if x is not None and math.isfinite(x) else None


@dataclass(frozen=True)
class StageFidelity:
    """One stage boundary: per-batch values and their mean and worst."""

    name: str
    cosine: tuple[float, ...]
    rel_l2: tuple[float, ...]

    @property
    def cosine_mean(self) -> float:
        return sum(self.cosine) / len(self.cosine)

    @property
    def cosine_worst(self) -> float:
        return min(self.cosine)

    @property
    def rel_l2_mean(self) -> float:
        return sum(self.rel_l2) / len(self.rel_l2)

    @property
    def rel_l2_worst(self) -> float:
        return max(self.rel_l2)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cosine_mean": self.cosine_mean,
            "cosine_worst": self.cosine_worst,
            "rel_l2_mean": _finite_or_none(self.rel_l2_mean),
            "rel_l2_worst": _finite_or_none(self.rel_l2_worst),
            "cosine": list(self.cosine),
            "rel_l2": [_finite_or_none(v) for v in self.rel_l2],
        }


@dataclass(frozen=True)
class BoxAgreement:
    """Decoded-box agreement (see :func:`match_boxes`), pooled over all samples.

    ``agreement`` is ``matched / fp32_boxes`` over every sample of every batch; ``worst`` is
    the lowest per-batch share. Both are None when the FP32 model produced no box at all.
    """

    top_k: int
    match_distance: float
    matched: int
    fp32_boxes: int
    int8_boxes: int
    per_batch: tuple[float | None, ...]

    @property
    def agreement(self) -> float | None:
        return self.matched / self.fp32_boxes if self.fp32_boxes else None

    @property
    def worst(self) -> float | None:
        values = [v for v in self.per_batch if v is not None]
        return min(values) if values else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "per_batch": list(self.per_batch), "agreement": self.agreement, "worst": self.worst}


@dataclass(frozen=True)
class FidelityReport:
    """INT8 fake-quant against FP32 on the same model and batches.

    ``stages`` are in data-flow order; ``boxes`` is None when the forward returned no boxes.
    """

    num_batches: int
    stages: tuple[StageFidelity, ...]
    boxes: BoxAgreement | None
    quantizers: int
    enabled_quantizers: int
    seconds: float = 0.0
    device: str = "cpu"

    def stage(self, name: str) -> StageFidelity:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r}; stages are {[s.name for s in self.stages]}")

    def as_dict(self) -> dict[str, Any]:
        """Everything, JSON-able (non-finite numbers become null): for ``fidelity.json``."""
        return {
            "num_batches": self.num_batches,
            "quantizers": self.quantizers,
            "enabled_quantizers": self.enabled_quantizers,
            "seconds": self.seconds,
            "device": self.device,
            "stages": [s.as_dict() for s in self.stages],
            "boxes": None if self.boxes is None else self.boxes.as_dict(),
        }

    def summary(self) -> dict[str, Any]:
        """A few headline numbers for the manifest: the worst stage, the last stage, the boxes."""
        worst_cos = min(self.stages, key=lambda s: s.cosine_worst)
        worst_rel = max(self.stages, key=lambda s: s.rel_l2_worst)
        last = self.stages[-1]
        return {
            "batches": self.num_batches,
            "min_cosine": round(worst_cos.cosine_worst, 6),
            "min_cosine_stage": worst_cos.name,
            "max_rel_l2": _finite_or_none(round(worst_rel.rel_l2_worst, 6)),
            "max_rel_l2_stage": worst_rel.name,
            f"{last.name}_cosine_mean": round(last.cosine_mean, 6),
            f"{last.name}_rel_l2_mean": _finite_or_none(round(last.rel_l2_mean, 6)),
            "box_agreement": None
            if self.boxes is None or self.boxes.agreement is None
            else round(self.boxes.agreement, 6),
        }

    def markdown(self) -> str:
        """A table for a Prefect markdown artifact (and for people reading fidelity.json)."""
        lines = [
            f"### INT8 fidelity: fake-quant vs FP32 on {self.num_batches} batch(es)",
            "",
            f"{self.enabled_quantizers} of {self.quantizers} quantizers enabled; "
            f"{self.seconds:.1f} s on {self.device}.",
            "",
            "| stage | cosine mean | cosine worst | rel. L2 mean | rel. L2 worst |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for s in self.stages:
            lines.append(
                f"| {STAGE_TITLES.get(s.name, s.name)} | {s.cosine_mean:.6f} | {s.cosine_worst:.6f} "
                f"| {s.rel_l2_mean:.4g} | {s.rel_l2_worst:.4g} |"
            )
        if self.boxes is not None:
            b = self.boxes
            share = "n/a (no FP32 boxes)" if b.agreement is None else f"{b.agreement:.1%}"
            worst = "n/a" if b.worst is None else f"{b.worst:.1%}"
            lines += [
                "",
                f"**Decoded boxes:** {share} of the FP32 top-{b.top_k} boxes matched by an INT8 box of "
                f"the same class with centre distance < {b.match_distance:g} m "
                f"({b.matched}/{b.fp32_boxes}; worst batch {worst}).",
            ]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- state handling
@contextmanager
def _restoring(model: nn.Module, quantizers: Sequence[TensorQuantizer]) -> Iterator[None]:
    """Put back every quantizer flag and every module's train/eval mode, also on error.

    Flags are set directly rather than through ``disable_calib()`` and friends, which log a
    warning per quantizer and would bury the report's own log lines.
    """
    flags = [(q, {f: getattr(q, f) for f in _FLAGS}) for q in quantizers]
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for q, saved in flags:
            for f, value in saved.items():
                setattr(q, f, value)
        for m, training in modes:
            m.training = training


def _check_quantizers(quantizers: Sequence[tuple[str, TensorQuantizer]]) -> int:
    """Number of quantizers that quantize; fail naming any that would quantize without amax.

    Without an ``_amax`` buffer pytorch-quantization silently falls back to dynamic
    per-batch scaling, so the report would measure a model that TensorRT never runs.
    """
    if not quantizers:
        raise FidelityError("the model has no quantizers: insert and calibrate them before the fidelity report")
    active = [(n, q) for n, q in quantizers if not q._disabled and q._if_quant]
    missing = [n for n, q in active if not hasattr(q, "_amax") and not getattr(q, "_learn_amax", False)]
    if missing:
        raise FidelityError(
            f"{len(missing)} enabled quantizer(s) have no amax (not calibrated): {', '.join(missing[:20])}"
        )
    return len(active)


def _split(outputs: Mapping[str, Any]) -> tuple[dict[str, Tensor], list[Mapping[str, Tensor]] | None]:
    stages = {k: v for k, v in outputs.items() if k != BOXES_KEY and isinstance(v, Tensor)}
    boxes = outputs.get(BOXES_KEY)
    return stages, (list(boxes) if boxes is not None else None)


def _check_finite(stages: Mapping[str, Tensor], which: str, index: int) -> None:
    for name, value in stages.items():
        if not torch.isfinite(value).all():
            raise FidelityError(f"{which} output {name!r} has non-finite values in fidelity batch {index}")


def fidelity_report(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: int,
    top_k: int = 100,
    match_distance: float = 0.5,
    forward: Forward | None = None,
) -> FidelityReport:
    """Compare the calibrated model's INT8 fake-quant outputs with its FP32 outputs.

    For each of the first ``num_batches`` batches: run ``forward`` with every quantizer
    disabled (the FP32 reference), then with the quantizers as they were (INT8), and
    compare every stage tensor (:func:`compare_tensors`) and the decoded boxes
    (:func:`match_boxes`). Excluded quantizers stay disabled in the INT8 pass, because
    that is what gets deployed. Histogram collection is switched off for both passes so
    the report never alters calibration statistics. Every quantizer flag and module mode
    is restored afterwards, also when a forward raises.

    Args:
        model: a BEVFusion (or any model) with calibrated quantizers.
        batches: an iterable of batch dicts; only the first ``num_batches`` are read.
        forward: ``(model, batch) -> mapping`` whose tensor values are the stages to
            compare and whose optional ``boxes`` is a list (per sample) of dicts with
            ``center``, ``score`` and ``label``. Default: :func:`bevfusion_forward`.

    Raises:
        FidelityError: fewer than ``num_batches`` batches, no quantizers, an enabled
            quantizer without amax, non-finite outputs, or mismatched pass outputs.
    """
    if num_batches < 1:
        raise FidelityError(f"num_batches must be >= 1, got {num_batches}")
    if top_k < 1 or not match_distance > 0:
        raise FidelityError(f"top_k must be >= 1 and match_distance > 0, got {top_k} and {match_distance}")
    available = len(batches) if isinstance(batches, Sized) else None
    if available is not None and available < num_batches:  # fail before any forward when we can
        raise FidelityError(f"asked for {num_batches} fidelity batches, the data has {available}")
    named = list(compat.iter_quantizers(model))
    enabled = _check_quantizers(named)
    quantizers = [q for _, q in named]
    run = forward or bevfusion_forward
    device = compat.model_device(model)
    log.info(
        "fidelity report: %d batches, %d of %d quantizers enabled, on %s", num_batches, enabled, len(named), device
    )

    cosines: dict[str, list[float]] = {}
    rel_l2s: dict[str, list[float]] = {}
    per_batch_boxes: list[float | None] = []
    matched_total = fp32_total = int8_total = 0
    has_boxes: bool | None = None
    seen = 0
    start = time.perf_counter()
    with _restoring(model, quantizers), torch.no_grad():
        model.eval()
        active = [(q, q._disabled) for q in quantizers]
        for q in quantizers:
            q._if_calib = False
        for batch in batches:
            if seen >= num_batches:
                break
            for q in quantizers:
                q._disabled = True
            fp32_stages, fp32_boxes = _split(run(model, batch))
            for q, disabled in active:
                q._disabled = disabled
            int8_stages, int8_boxes = _split(run(model, batch))
            _check_finite(fp32_stages, "FP32", seen)
            _check_finite(int8_stages, "INT8", seen)
            if list(fp32_stages) != list(int8_stages) or not fp32_stages:
                raise FidelityError(
                    f"forward returned stages {list(fp32_stages)} in FP32 and {list(int8_stages)} in INT8"
                )
            if cosines and list(cosines) != list(fp32_stages):
                raise FidelityError(f"batch {seen} gave stages {list(fp32_stages)}, earlier ones {list(cosines)}")
            for name, f in fp32_stages.items():
                cos, rel = compare_tensors(int8_stages[name], f)
                cosines.setdefault(name, []).append(cos)
                rel_l2s.setdefault(name, []).append(rel)
            has_boxes = fp32_boxes is not None and int8_boxes is not None
            box_note = ""
            if has_boxes:
                m = n = 0
                for f_boxes, q_boxes in zip(fp32_boxes, int8_boxes, strict=True):
                    mi, ni = match_boxes(f_boxes, q_boxes, top_k=top_k, match_distance=match_distance)
                    m, n = m + mi, n + ni
                    int8_total += min(top_k, len(q_boxes["score"]))
                matched_total, fp32_total = matched_total + m, fp32_total + n
                per_batch_boxes.append(m / n if n else None)
                box_note = f"; boxes {m}/{n} matched"
            seen += 1
            log.info(
                "fidelity batch %d/%d: %s%s",
                seen,
                num_batches,
                ", ".join(f"{k} cos={cosines[k][-1]:.6f} relL2={rel_l2s[k][-1]:.3g}" for k in cosines),
                box_note,
            )
    if seen < num_batches:
        raise FidelityError(f"asked for {num_batches} fidelity batches, the data gave {seen}")
    seconds = time.perf_counter() - start
    report = FidelityReport(
        num_batches=seen,
        stages=tuple(StageFidelity(k, tuple(cosines[k]), tuple(rel_l2s[k])) for k in cosines),
        boxes=BoxAgreement(top_k, float(match_distance), matched_total, fp32_total, int8_total, tuple(per_batch_boxes))
        if has_boxes
        else None,
        quantizers=len(named),
        enabled_quantizers=enabled,
        seconds=seconds,
        device=str(device),
    )
    log.info("fidelity report done in %.1f s: %s", seconds, report.summary())
    return report


__all__ = [
    "STAGES",
    "BoxAgreement",
    "FidelityError",
    "FidelityReport",
    "StageFidelity",
    "bevfusion_forward",
    "compare_tensors",
    "fidelity_report",
    "match_boxes",
]
