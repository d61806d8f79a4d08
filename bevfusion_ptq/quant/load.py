"""Rebuild a calibrated model from its portable files, without calibrating again.

``state_dict.pth`` holds the weights (BN already folded) and every quantizer's amax;
``quantizers.json`` holds what a state dict cannot: which quantizers are enabled, and each
one's descriptor. Rebuilding replays the deterministic part of the pipeline on the config
(build, insert quantizers, fold BN, record ReLUs) and then loads the two files strictly, so a
file from another model, rule set or version fails loudly instead of loading half.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bevfusion_ptq.errors import CheckpointError
from bevfusion_ptq.quant import compat
from bevfusion_ptq.quant.fold_relu import fold_relu
from bevfusion_ptq.quant.fuse import fuse_bn
from bevfusion_ptq.quant.insert import insert_quantizers
from bevfusion_ptq.quant.report import axis_list, calibrator_kind, quantizer_paths
from bevfusion_ptq.quant.rules import bevfusion_rules

log = logging.getLogger(__name__)


def _read_state_dict(state_dict: str | Path | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if isinstance(state_dict, Mapping):
        return state_dict
    return torch.load(Path(state_dict), map_location="cpu", weights_only=True)


def _read_quantizers(quantizers: str | Path | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(quantizers, list):
        return quantizers
    return json.loads(Path(quantizers).read_text())


def _apply_table(model: nn.Module, table: list[dict[str, Any]], source: str) -> None:
    """Enable/disable each quantizer as recorded, after checking the descriptors agree."""
    by_name = {paths[0]: q for q, paths in quantizer_paths(model)}
    rows = {row["name"]: row for row in table}
    if set(rows) != set(by_name):
        unknown, missing = sorted(set(rows) - set(by_name)), sorted(set(by_name) - set(rows))
        raise CheckpointError(
            f"{source} does not describe this model's quantizers "
            f"(not in the model: {unknown[:5]}, not in the file: {missing[:5]})"
        )
    for name, quantizer in by_name.items():
        row = rows[name]
        actual = {"num_bits": quantizer.num_bits, "axis": axis_list(quantizer), "calibrator": calibrator_kind(quantizer)}
        recorded = {k: row.get(k) for k in actual}
        if actual != recorded:
            raise CheckpointError(f"{source}: quantizer {name} is {recorded} in the file but {actual} in the model")
        if row["enabled"]:
            quantizer.enable()
        else:
            quantizer.disable()


def load_quantized(
    config: Any,
    state_dict: str | Path | Mapping[str, torch.Tensor],
    quantizers: str | Path | list[dict[str, Any]],
    *,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """The calibrated fake-quant model described by ``state_dict.pth`` + ``quantizers.json``.

    ``config`` is what :func:`bevfusion_ptq.model.config.load_config` accepts (a shipped name,
    a path, or a loaded config). Outputs equal those of the model that was saved.
    """
    from bevfusion_ptq.model.builder import build_model
    from bevfusion_ptq.model.config import load_config

    cfg = config if hasattr(config, "model") else load_config(config)
    model = build_model(cfg).eval()
    insert_quantizers(model, bevfusion_rules(exclude=()))
    fuse_bn(model)
    fold_relu(model)
    state = _read_state_dict(state_dict)
    compat.prepare_amax_buffers(model, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"state dict does not fit the quantized model: {exc}") from None
    _apply_table(model, _read_quantizers(quantizers), str(quantizers) if not isinstance(quantizers, list) else "quantizer table")
    log.info("rebuilt the quantized model from its state dict and quantizer table")
    return model.to(device).eval()


def load_version(version_dir: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """The calibrated model of a saved or fetched version directory, from its own files.

    The model is built from the version's ``config.json`` (the resolved config it was made
    with), not from the config name or path it records: a custom ``.py`` config may be
    gone, or edited since, wherever the version is reloaded.
    """
    folder = Path(version_dir)
    return load_quantized(
        folder / "config.json", folder / "state_dict.pth", folder / "quantizers.json", device=device
    )
