"""nuScenes evaluation of the FP32 and INT8 passes, and the gate before publishing.

- :mod:`.results`: decoded boxes (lidar frame) -> the nuScenes results format (global frame);
- :mod:`.predict`: the calibrated model run FP32 and INT8 over the evaluation samples;
- :mod:`.database`: ``NuScenes(version, dataroot)`` with one-line errors for missing tables;
- :mod:`.metrics`: nuscenes-devkit's ``DetectionEval`` (on the whole split or a subset) and
  its PR/TP plots as PNG;
- :mod:`.gate`: the verdict, a pure function of the measurements and the thresholds;
- :mod:`.report`: FP32 | INT8 | delta tables and a markdown page with the plots embedded.

The devkit (and matplotlib) are imported on first use, so importing this package is cheap.
"""

from bevfusion_ptq.evaluation.gate import GateCheck, GateThresholds, GateVerdict, gate_verdict
from bevfusion_ptq.evaluation.results import attribute_name, boxes_from_internal, results_document, sample_results

__all__ = [
    "GateCheck", "GateThresholds", "GateVerdict", "attribute_name", "boxes_from_internal", "gate_verdict",
    "results_document", "sample_results",
]
