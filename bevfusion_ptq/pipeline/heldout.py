"""Held-out batches: samples of the data's val split, never seen by the histograms.

``--calib-method auto`` and the sensitivity analysis measure errors on them; measuring on
the calibration samples would reward amax values that fit those samples' outliers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bevfusion_ptq.errors import DatasetError
from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.pipeline.inputs import config_identity
from bevfusion_ptq.pipeline.refs import DatasetRef

VAL_INFO_NAME = "nuscenes_infos_val.pkl"


def heldout_set(params: PTQParams, data: DatasetRef) -> Any:
    """``heldout_batches`` keyframes of ``<data root>/nuscenes_infos_val.pkl``, spread over its
    scenes, with the deterministic test pipeline."""
    from bevfusion_ptq.data import build_calibration_set

    info = Path(data.data_root) / VAL_INFO_NAME
    if not info.is_file():
        raise DatasetError(f"held-out batches come from the val split, and {info} does not exist")
    cfg, _ = config_identity(params)
    return build_calibration_set(
        data.data_root, info, cfg.data, params.heldout_batches, sampling="spread", pipeline="test", seed=params.seed
    )


def heldout_identity(params: PTQParams, data: DatasetRef) -> dict[str, Any]:
    """What a held-out measurement depends on: the samples (fingerprint) and their count."""
    return {"batches": params.heldout_batches, "fingerprint": heldout_set(params, data).fingerprint}
