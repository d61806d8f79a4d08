"""What the BEV pooling index rule changes: truncation toward zero (the engine's) vs floor.

For each config, one batch of a generated nuScenes tree goes through the camera geometry, and
the frustum points are assigned to cells with both rules. Printed: points kept by each, the
points only truncation keeps, and how many non-empty BEV cells (summed over features) change.

With ``--calibrate`` it also calibrates bevfusion-tiny on the generated tree under each rule
and prints the fidelity report and the amax of the quantizers downstream of the view
transform (the fuser input, the decoder's first conv), so the effect on calibration shows.

    python bench/bev_pool_rule.py --out DIR [--configs bevfusion-r50 bevfusion-tiny] [--calibrate]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import tempfile
from pathlib import Path

import torch

from bevfusion_ptq.data import build_calibration_set, make_dataset
from bevfusion_ptq.model import bev_pool as pool_module
from bevfusion_ptq.model import vtransform as vt_module
from bevfusion_ptq.model.builder import build_model
from bevfusion_ptq.model.config import load_config


def _floor(geom: torch.Tensor, lower: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    return torch.floor((geom - lower) / cell).long()


@contextlib.contextmanager
def pooling_rule(rule: str):
    """Run the model with the floor rule (the old one) or the engine's truncation."""
    saved = vt_module.frustum_to_voxel_coords
    if rule == "floor":
        vt_module.frustum_to_voxel_coords = _floor
    try:
        yield
    finally:
        vt_module.frustum_to_voxel_coords = saved


def frustum_figures(name: str, root: Path) -> dict:
    cfg = load_config(name)
    model = build_model(cfg)
    vt = model.encoders.camera.vtransform
    cset = build_calibration_set(root, None, cfg.data, 1)
    batch = next(iter(cset.loader(num_workers=0)))
    geom = vt.get_geometry(batch["camera2lidar"], batch["camera_intrinsics"], batch["img_aug_matrix"],
                           batch["lidar_aug_matrix"])
    lower, cell = vt.bx - vt.dx / 2.0, vt.dx
    n = vt.nx.tolist()
    kept, cells = {}, {}
    for rule, fn in (("floor", _floor), ("trunc", pool_module.frustum_to_voxel_coords)):
        idx = fn(geom, lower, cell).view(-1, 3)
        inside = ((idx >= 0) & (idx < torch.tensor(n))).all(1)
        kept[rule] = inside
        feats = torch.ones(int(inside.sum()), 1)
        coords = torch.cat([torch.zeros(len(feats), 1, dtype=torch.long), idx[inside]], 1)
        cells[rule] = pool_module.bev_pool(feats, coords, 1, n).sum(dim=(1, 2))[0]  # [X, Y] point counts
    nonempty = (cells["floor"] > 0) | (cells["trunc"] > 0)
    changed = (cells["floor"] != cells["trunc"]) & nonempty
    z = geom.view(-1, 3)[:, 2]
    only_trunc = kept["trunc"] & ~kept["floor"]
    return {
        "config": name,
        "frustum_points": int(z.numel()),
        "kept_floor": int(kept["floor"].sum()),
        "kept_trunc": int(kept["trunc"].sum()),
        "kept_only_by_trunc": int(only_trunc.sum()),
        "share_of_kept_lost_by_floor": round(float(only_trunc.sum()) / float(kept["trunc"].sum()), 4),
        "z_range_of_those_m": [round(float(z[only_trunc].min()), 2), round(float(z[only_trunc].max()), 2)]
        if bool(only_trunc.any()) else None,
        "nonempty_bev_cells": int(nonempty.sum()),
        "bev_cells_changed": int(changed.sum()),
        "share_of_cells_changed": round(float(changed.sum()) / float(nonempty.sum()), 4),
    }


def calibration_figures(root: Path, work: Path) -> dict:
    """Calibrate tiny under each rule through the library's stages (random seed-0 weights)."""
    import os

    from bevfusion_ptq import pipeline
    from bevfusion_ptq.params import PTQParams
    from bevfusion_ptq.workdir import load_model

    out = {}
    for rule in ("floor", "trunc"):
        os.environ["BEVFUSION_PTQ_HOME"] = str(work / rule)
        params = PTQParams(data_root=str(root), calib_batches=8, fidelity_batches=4, device="cpu",
                           output=str(work / rule / "out"))
        with pooling_rule(rule):
            _, data, ref = pipeline.calibrated_in_process(params)
            fid = pipeline.fidelity_stage(params, ref, data)
        model = load_model(ref)
        amax = {}
        for path in ("fuser.0._input_quantizer", "decoder.backbone.blocks.0.0._input_quantizer"):
            amax[path] = round(float(model.get_submodule(path).amax), 5)
        out[rule] = {"fidelity": fid.summary, "amax": amax}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--configs", nargs="+", default=["bevfusion-r50", "bevfusion-tiny"])
    parser.add_argument("--calibrate", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)  # pytorch-quantization's per-quantizer lines
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        make_dataset(root, scenes=3, frames=10, seed=0)
        report = {"frustum": [frustum_figures(name, root) for name in args.configs]}
        if args.calibrate:
            report["calibration"] = calibration_figures(root, Path(tmp) / "work")
    (args.out / "bev_pool_rule.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
