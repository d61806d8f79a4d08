"""Re-export a saved version from its portable files, without the pickle and without calibrating.

A version directory holds ``state_dict.pth`` (weights with BN folded, every amax),
``quantizers.json`` (which quantizers are on, and their descriptors) and ``config.json`` (the
resolved model config). That is enough to rebuild the calibrated model
(:func:`bevfusion_ptq.quant.load.load_quantized`) and write the deployment set; the static
shapes come from a synthetic batch of the config's image size, since only shapes matter there.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from mmengine.config import Config

from bevfusion_ptq.errors import ExportError
from bevfusion_ptq.export.deployment import GraphInfo, export_deployment

log = logging.getLogger(__name__)

REQUIRED = ("state_dict.pth", "quantizers.json", "config.json")


def export_version(version_dir: str | Path, out_dir: str | Path, precisions: Sequence[str] = ("int8",)) -> list[GraphInfo]:
    """Write the deployment set of the version in ``version_dir`` into ``out_dir``."""
    from bevfusion_ptq.data.batch import random_batch
    from bevfusion_ptq.quant.load import load_quantized

    folder = Path(version_dir)
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise ExportError(f"{folder} is not a saved version: it lacks {', '.join(missing)}")
    try:
        cfg = Config(json.loads((folder / "config.json").read_text()))
    except ValueError as exc:
        raise ExportError(f"{folder / 'config.json'} is not valid JSON: {exc}") from None
    manifest = folder / "manifest.json"
    model_name = json.loads(manifest.read_text()).get("model", folder.parent.name) if manifest.is_file() else folder.parent.name
    model = load_quantized(cfg, folder / "state_dict.pth", folder / "quantizers.json")
    batch = random_batch(cfg, batch_size=1, seed=0)
    log.info("re-exporting %s (%s) to %s", folder, ", ".join(precisions), out_dir)
    return export_deployment(model, batch, out_dir, precisions, model_name=model_name)
