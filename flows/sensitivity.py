"""The sensitivity analysis on its own: the PTQ flow's stages up to the statistics, then the
analysis. Everything before it is cached by the same keys as a PTQ run's."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow

from bevfusion_ptq.params import PTQParams
from tasks import stages
from tasks.sensitivity import sensitivity_report


@flow(name="bevfusion-ptq-sensitivity", log_prints=False)
def sensitivity_analysis(params: PTQParams = PTQParams()) -> dict:
    """Rank quantizer groups by the metric drop they cause; propose exclusions for the target."""
    run = stages.StageRunner()
    ckpt = run(stages.prepare_checkpoint, params=params)
    data = run(stages.build_dataset, params=params)
    model = run(stages.load_model, params=params, ckpt=ckpt)
    model = run(stages.insert_quantizers, params=params, ref=model)
    model = run(stages.fuse_bn, params=params, ref=model)
    statistics = run(stages.collect_statistics, params=params, ref=model, data=data)
    result = run(stages.sensitivity, params=params, ref=model, stats=statistics, data=data)
    sensitivity_report(result)
    return {"path": result.path, "chart": result.chart, "result": json.loads(Path(result.path).read_text()),
            "timings": run.timings}
