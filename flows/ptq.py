"""The PTQ flow: the table of contents of a run."""

from __future__ import annotations

import logging

from prefect import flow

from bevfusion_ptq.params import PTQParams
from tasks import stages

# pytorch-quantization logs one absl WARNING per quantizer each time calibration is switched
# on or off ("Disable MaxCalibrator"): hundreds of lines per run that hide the real ones.
logging.getLogger("absl").setLevel(logging.ERROR)


@flow(name="bevfusion-ptq", log_prints=False)
def ptq(params: PTQParams = PTQParams()) -> dict:
    """Quantize a BEVFusion checkpoint to INT8 (fake-quant) and save a versioned artifact."""
    ckpt = stages.prepare_checkpoint(params)
    data = stages.build_dataset(params)
    model = stages.load_model(params, ckpt)
    model = stages.insert_quantizers(params, model)
    model = stages.fuse_bn(model)
    model = stages.calibrate(params, model, data)
    saved = stages.save_artifacts(params, model, ckpt, data)
    return {"path": str(saved.path), "version": saved.manifest["version"], "reused": saved.reused}
