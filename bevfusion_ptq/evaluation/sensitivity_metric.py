"""nuScenes mAP or NDS as the sensitivity analysis' metric (``--sensitivity-metric nds|map``).

The analysis measures one configuration of quantizers at a time (one group INT8, or all but
one). Here a measurement is what the evaluate stage does for INT8, on the held-out val
keyframes: decode every batch with the model as configured, write a results file, and score
it with nuscenes-devkit. The drop is FP32's score minus this one, in points (x100), the unit
of the gate's ``--max-map-drop`` / ``--max-nds-drop``.

Why offer it next to the fidelity errors: those are smooth and cheap, but they weigh every
output cell alike; the detection score is what a user loses. On a few keyframes it is noisy
(one box more or less moves it), so use it with enough held-out batches.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from bevfusion_ptq.evaluation.metrics import evaluate_detections
from bevfusion_ptq.evaluation.predict import decode_batch
from bevfusion_ptq.evaluation.results import results_document

#: metric name -> (the devkit's summary key, its title)
SCORES: dict[str, tuple[str, str]] = {"nds": ("nd_score", "nuScenes NDS"), "map": ("mean_ap", "nuScenes mAP")}


class DetectionScoreMetric:
    """Drop of nuScenes NDS or mAP (points) against FP32 on fixed val batches."""

    def __init__(
        self,
        score: str,
        batches: Sequence[Mapping[str, Any]],
        *,
        nusc: Any,
        split: str,
        split_tokens: Sequence[str],
        poses: Mapping[str, tuple[np.ndarray, np.ndarray]],
        class_names: Sequence[str],
    ) -> None:
        if score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
        self.key, title = SCORES[score]
        self.name = f"{title} drop (points)"
        self.batches = list(batches)
        self.tokens = [str(m["token"]) for b in self.batches for m in b["metas"]]
        self.nusc, self.split, self.split_tokens = nusc, split, list(split_tokens)
        self.poses, self.class_names = poses, tuple(class_names)
        self._folder = tempfile.TemporaryDirectory(prefix="ptq-sensitivity-eval-")
        self.reference: float | None = None

    def score(self, model: nn.Module) -> float:
        """The devkit's score (0..1) of the model as its quantizers are set now."""
        results: dict[str, list[dict[str, Any]]] = {}
        for batch in self.batches:
            decode_batch(model, batch, self.poses, self.class_names, results)
        folder = Path(self._folder.name)
        path = folder / "results.json"
        path.write_text(json.dumps(results_document(results)))
        found = evaluate_detections(
            self.nusc, path, self.split, self.tokens, folder / "eval", split_tokens=self.split_tokens, render=False
        )
        return float(found.summary[self.key])

    def prepare(self, model: nn.Module) -> None:
        self.reference = self.score(model)

    def drop(self, model: nn.Module) -> float:
        if self.reference is None:
            raise RuntimeError("prepare() must measure the FP32 model first")
        return 100.0 * (self.reference - self.score(model))
