"""The PTQ flow: the table of contents of a run."""

from __future__ import annotations

import logging

from prefect import flow
from prefect.runtime import flow_run

from bevfusion_ptq.errors import GateFailedError
from bevfusion_ptq.params import PTQParams
from tasks import stages
from tasks.preflight import check_inputs
from tasks.gate import gate
from tasks.publish import publish
from tasks.report import report
from tasks.sensitivity import sensitivity_report

# pytorch-quantization logs one absl WARNING per quantizer each time calibration is switched
# on or off ("Disable MaxCalibrator"): hundreds of lines per run that hide the real ones.
logging.getLogger("absl").setLevel(logging.ERROR)
# Calibration progress (batch, rate, ETA) and resume notices come from the library's loggers;
# deployments ship them to the run's logs with PREFECT_LOGGING_EXTRA_LOGGERS=bevfusion_ptq.
if logging.getLogger("bevfusion_ptq").level == logging.NOTSET:
    logging.getLogger("bevfusion_ptq").setLevel(logging.INFO)


@flow(name="bevfusion-ptq", log_prints=False)
def ptq(params: PTQParams = PTQParams()) -> dict:
    """Quantize a BEVFusion checkpoint to INT8 (fake-quant) and publish a versioned artifact."""
    check_inputs(params)  # a missing file or an unwritable bucket fails now, not after calibration
    run = stages.StageRunner()
    ckpt = run(stages.prepare_checkpoint, params=params)
    stages.check_disk(params, ckpt)  # read-only or full output/state: fail now, not after calibrating
    data = run(stages.build_dataset, params=params)
    model = run(stages.load_model, params=params, ckpt=ckpt)
    model = run(stages.insert_quantizers, params=params, ref=model)
    model = run(stages.fuse_bn, params=params, ref=model)
    statistics = run(stages.collect_statistics, params=params, ref=model, data=data)
    sensitivity = (
        run(stages.sensitivity, params=params, ref=model, stats=statistics, data=data) if params.runs_sensitivity else None
    )
    calibrated = run(stages.compute_amax, params=params, ref=model, stats=statistics, data=data, sensitivity=sensitivity)
    fidelity = run(stages.fidelity, params=params, ref=calibrated, data=data)
    exported = run(stages.export, params=params, calibrated=calibrated, data=data)
    evaluation = run(stages.evaluate, params=params, ref=calibrated, data=data)
    verdict = gate(params, evaluation, fidelity)
    saved = run(
        stages.save_artifacts, params=params, calibrated=calibrated, ckpt=ckpt, data=data,
        fidelity=fidelity, flow_run_id=flow_run.get_id(), evaluation=evaluation, verdict=verdict,
        exported=exported,
    )
    if verdict.failed:  # kept in the outbox, not published; latest stays where it was
        published = {"url": None, "reused": False, "held": True}
    else:
        published = publish(str(saved.path), params.output, params.sse, params.sse_kms_key_id)
    report(params, saved, fidelity, run.timings, published)
    if sensitivity is not None:
        sensitivity_report(sensitivity)
    if verdict.failed:
        raise GateFailedError(
            f"gate failed: {verdict.reason}; version {saved.manifest['version']} not published, kept at {saved.path}"
        )
    return {
        "path": str(saved.path),
        "version": saved.manifest["version"],
        "reused": saved.reused or published["reused"],
        "url": published["url"],
        "fidelity": fidelity.summary,
        "evaluation": evaluation.summary,
        "gate": verdict.as_dict(),
        "flow_run_id": flow_run.get_id(),
        "timings": run.timings,
        "recomputed": run.recomputed,
    }
