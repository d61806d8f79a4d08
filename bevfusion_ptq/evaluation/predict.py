"""Run the calibrated model over the evaluation samples twice: FP32 and INT8 (fake-quant).

Both passes use the *same* model object, as the fidelity report does: FP32 with every
quantizer passing its input through, INT8 with the quantizers as calibrated (excluded ones
stay off, as deployed). Each batch is loaded once and run twice, so the two passes see the
same tensors and data loading is paid once.

Boxes that are not finite (the reference's "NaN boxes after PTQ") cannot be submitted to
the devkit, which refuses them; they are dropped and counted, so a model that produces
them shows it twice: in the count and in a lower mAP.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from bevfusion_ptq.data.batch import move_batch
from bevfusion_ptq.evaluation.results import sample_results
from bevfusion_ptq.quant import compat

log = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = ("fp32", "int8")
_BOX_KEYS = ("center", "size", "yaw", "velocity", "score")

ProgressFn = Callable[[int, int], None]


@contextmanager
def precision(model: nn.Module, mode: str) -> Iterator[None]:
    """Run ``model`` as FP32 (every quantizer bypassed) or INT8 (quantizers as calibrated).

    Calibrators are off in both; every flag is put back afterwards, also on error.
    """
    if mode not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {mode!r}")
    quantizers = [q for _, q in compat.iter_quantizers(model)]
    saved = [(q, q._disabled, q._if_calib) for q in quantizers]
    try:
        for q in quantizers:
            q._if_calib = False
            if mode == "fp32":
                q._disabled = True
        yield
    finally:
        for q, disabled, calib in saved:
            q._disabled, q._if_calib = disabled, calib


def _finite(boxes: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    keep = torch.ones_like(boxes["score"], dtype=torch.bool)
    for key in _BOX_KEYS:
        value = boxes[key]
        keep &= torch.isfinite(value.reshape(len(keep), -1)).all(dim=1)
    dropped = int((~keep).sum())
    return ({k: v[keep] for k, v in boxes.items()} if dropped else dict(boxes)), dropped


def record_poses(records: Iterable[Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Sample token -> ``(lidar2ego, ego2global)`` of info records, as :func:`predict` takes them."""
    return {r.token: (r.lidar2ego, r.ego2global) for r in records}


def class_names_of(cfg: Any) -> tuple[str, ...]:
    """The detection classes of a config, the nuScenes ten when it names none."""
    from bevfusion_ptq.data.infos import NUSCENES_CLASSES

    return tuple(cfg.get("class_names", None) or NUSCENES_CLASSES)


def decode_batch(
    model: nn.Module,
    batch: Mapping[str, Any],
    poses: Mapping[str, tuple[np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    results: dict[str, list[dict[str, Any]]],
) -> int:
    """Run ``model`` as its quantizers are set now on a batch already on its device; add each
    sample's results entries to ``results``. Returns the non-finite boxes dropped."""
    decoded = model(batch)["boxes"]
    dropped = 0
    for b, meta in enumerate(batch["metas"]):
        token = str(meta["token"])
        lidar2ego, ego2global = poses[token]
        boxes, bad = _finite(decoded[b])
        dropped += bad
        results[token] = sample_results(token, boxes, lidar2ego, ego2global, class_names)
    return dropped


@dataclass
class Predictions:
    """The results entries per precision and sample token, and what was dropped."""

    results: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=lambda: {p: {} for p in PRECISIONS})
    nonfinite_boxes: dict[str, int] = field(default_factory=lambda: {p: 0 for p in PRECISIONS})
    seconds: float = 0.0


def predict(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    poses: Mapping[str, tuple[np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    *,
    total: int,
    progress: ProgressFn | None = None,
) -> Predictions:
    """Decode both passes of every batch into nuScenes results entries.

    ``poses`` maps a sample token to its ``(lidar2ego, ego2global)`` 4x4 transforms (float64,
    from the info file; the batch's float32 copies would round global coordinates).
    """
    device = compat.model_device(model)
    out = Predictions()
    started = last_log = time.perf_counter()
    seen = 0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            batch = move_batch(batch, device)
            for mode in PRECISIONS:
                with precision(model, mode):
                    out.nonfinite_boxes[mode] += decode_batch(model, batch, poses, class_names, out.results[mode])
            seen += len(batch["metas"])
            if progress is not None:
                progress(seen, total)
            now = time.perf_counter()
            if seen == total or now - last_log >= 10.0:
                rate = seen / max(now - started, 1e-9)
                eta = (total - seen) / rate if rate > 0 else math.inf
                log.info("evaluation sample %d/%d (FP32 + INT8), %.2f samples/s, ETA %.0f s", seen, total, rate, eta)
                last_log = now
    out.seconds = time.perf_counter() - started
    for mode, dropped in out.nonfinite_boxes.items():
        if dropped:
            log.warning("%s pass: %d decoded boxes had non-finite values and were dropped", mode.upper(), dropped)
    return out
