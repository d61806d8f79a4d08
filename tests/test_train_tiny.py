"""The demo model's training objective (tools/), its checkpoint file, and the embedded default.

The objective's targets must mean what ``TransFusionHead.decode`` reads back, because the
nuScenes results format (and every box figure) is built from decoded boxes: a matched query
whose outputs equal its regression targets must decode to its gt box.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

from bevfusion_ptq.data import random_batch
from bevfusion_ptq.model import build_model, load_config, load_model
from tools.tiny_measure import DetectionMeasure
from tools.tiny_objective import (
    REGRESSION_HEADS,
    BevGrid,
    GroundTruth,
    HungarianAssigner,
    TransFusionObjective,
    heatmap_targets,
    regression_targets,
)
from tools.train_tiny import CHECKPOINT_NAME, allow_cpu_sparse_backward, grid_of, save_checkpoint

CLASSES = list(load_config("bevfusion-tiny").data.class_names)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = load_config("bevfusion-tiny")
    return cfg, build_model(cfg)


def _gt(boxes, names, velocity=None) -> dict:
    boxes = np.asarray(boxes, dtype=np.float32)
    vel = np.zeros((len(boxes), 2), np.float32) if velocity is None else np.asarray(velocity, np.float32)
    return {"gt_boxes": boxes, "gt_names": names, "gt_velocity": vel}


META = _gt(
    [
        [10.3, -5.2, 0.85, 4.6, 1.9, 1.7, 0.4],  # car
        [-20.0, 31.7, 0.9, 0.7, 0.7, 1.8, -2.9],  # pedestrian
        [40.1, 40.2, 0.5, 0.45, 0.45, 1.0, 3.1],  # traffic_cone
        [70.0, 0.0, 0.85, 4.6, 1.9, 1.7, 0.0],  # car off the grid: no target
        [1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 0.0],  # unknown class: no target
    ],
    ["car", "pedestrian", "traffic_cone", "car", "animal"],
    [[3.0, -1.0], [0.5, 0.2], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
)


def test_ground_truth_keeps_known_classes_on_the_grid(tiny):
    cfg, model = tiny
    grid = grid_of(model, cfg)
    assert (grid.nx, grid.ny, grid.step_x, grid.x_min) == (30, 30, pytest.approx(3.6), -54.0)
    gt = GroundTruth.from_meta(META, CLASSES, grid)
    assert gt.labels.tolist() == [CLASSES.index("car"), CLASSES.index("pedestrian"), CLASSES.index("traffic_cone")]


def test_heatmap_has_a_unit_peak_at_each_gt_cell_and_nowhere_else(tiny):
    cfg, model = tiny
    grid = grid_of(model, cfg)
    gt = GroundTruth.from_meta(META, CLASSES, grid)
    heatmap = heatmap_targets(gt, grid, len(CLASSES), min_radius=1)
    assert heatmap.shape == (10, 30, 30)
    peaks = {tuple(int(v) for v in p) for p in heatmap.eq(1).nonzero()}
    expected = {
        (int(label), int((x + 54) / 3.6), int((y + 54) / 3.6)) for (x, y), label in zip(gt.boxes[:, :2].tolist(), gt.labels)
    }
    assert peaks == expected
    car, (ix, iy) = CLASSES.index("car"), (17, 13)
    assert (car, ix, iy) in peaks
    # a Gaussian around the peak (radius >= 1): neighbours lit, lower than the peak, zero far away
    assert 0 < heatmap[car, ix + 1, iy] < 1 and 0 < heatmap[car, ix, iy - 1] < 1
    assert heatmap[car, ix + 3, iy] == 0 and heatmap[CLASSES.index("bus")].sum() == 0


def _queries(gt: GroundTruth, grid: BevGrid, proposals: int = 12) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Logits [P, C] and centres [P, 2]: query 2k sits near gt k with its class; the rest are
    far away with low scores. Returns the queries that should be matched."""
    torch.manual_seed(1)
    logits = torch.full((proposals, len(CLASSES)), -4.0)
    centers = torch.rand(proposals, 2) * 3 + 1  # corner of the grid, far from every gt
    cells = grid.to_cells(gt.boxes[:, :2])
    wanted = []
    for k in range(len(gt.labels)):
        q = 2 * k + 1
        logits[q, gt.labels[k]] = 2.0
        centers[q] = cells[k] + 0.2
        wanted.append(q)
    return logits, centers, wanted


def test_hungarian_assignment_matches_each_gt_to_its_nearby_query(tiny):
    cfg, model = tiny
    grid = grid_of(model, cfg)
    gt = GroundTruth.from_meta(META, CLASSES, grid)
    logits, centers, wanted = _queries(gt, grid)
    rows, cols = HungarianAssigner(grid)(logits, centers, gt)
    assert dict(zip(cols.tolist(), rows.tolist())) == {k: q for k, q in enumerate(wanted)}


def test_matched_regression_targets_decode_to_the_gt_boxes(tiny):
    """Feed the head's decoder predictions that equal the targets of matched queries."""
    cfg, model = tiny
    head = model.heads["object"]
    grid = grid_of(model, cfg)
    gt = GroundTruth.from_meta(META, CLASSES, grid)
    logits, centers, wanted = _queries(gt, grid)
    objective = TransFusionObjective(len(CLASSES), grid)
    proposals = len(logits)
    preds = {"heatmap": logits.T[None], "center": centers.T[None]}
    targets = objective.targets(preds, [gt])
    assert targets["labels"][0, wanted].tolist() == gt.labels.tolist()
    assert targets["labels"][0].ne(len(CLASSES)).sum() == len(wanted)  # the rest are background

    channels = targets["regression"][0].T  # [10, P]
    start = 0
    for name, size in REGRESSION_HEADS:
        preds[name] = channels[start : start + size][None]
        start += size
    # matched queries score ~1, the others ~0 (decode sorts by score; labels repeat)
    matched = targets["labels"][0].ne(len(CLASSES)).float()
    preds["heatmap"] = (matched * 28.0 - 20.0).expand(1, len(CLASSES), proposals)
    preds["query_heatmap_score"] = torch.ones(1, len(CLASSES), proposals)
    preds["query_labels"] = targets["labels"].clamp(max=len(CLASSES) - 1)
    boxes = head.decode(preds)[0]
    order = [int((boxes["label"] == gt.labels[k]).nonzero()[0]) for k in range(len(wanted))]
    got = {key: boxes[key][order] for key in ("center", "size", "yaw", "velocity", "label")}
    torch.testing.assert_close(got["center"], gt.boxes[:, :3], atol=1e-4, rtol=0)
    torch.testing.assert_close(got["size"], gt.boxes[:, 3:6], atol=1e-4, rtol=1e-4)
    yaw_error = torch.remainder(got["yaw"] - gt.boxes[:, 6] + math.pi, 2 * math.pi) - math.pi
    assert yaw_error.abs().max() < 1e-5
    torch.testing.assert_close(got["velocity"], gt.velocity)
    assert got["label"].tolist() == gt.labels.tolist()


def test_objective_on_the_model_gives_finite_losses_and_gradients_everywhere(tiny):
    cfg, model = tiny
    grid = grid_of(model, cfg)
    batch = random_batch(cfg, batch_size=2, num_points=4000, seed=3)
    batch["metas"] = [dict(m, **META) for m in batch["metas"]]
    allow_cpu_sparse_backward()
    model.train()
    try:
        preds = model.heads["object"](model.extract_features(batch)["decoder_out"])
        gts = [GroundTruth.from_meta(m, CLASSES, grid) for m in batch["metas"]]
        losses = TransFusionObjective(len(CLASSES), grid)(preds, gts)
        assert int(losses["matched"]) == 6
        assert all(torch.isfinite(losses[k]) and losses[k] > 0 for k in ("loss_heatmap", "loss_cls", "loss_bbox"))
        model.zero_grad()
        losses["loss"].backward()
        for prefix in ("encoders.camera.backbone", "encoders.lidar.backbone", "fuser", "heads.object.prediction_heads"):
            grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix) and p.requires_grad]
            assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), prefix
    finally:
        model.zero_grad()
        model.eval()


def test_saved_checkpoint_is_small_fp16_and_loads_strictly_as_fp32(tiny, tmp_path, caplog):
    cfg, model = tiny
    path = tmp_path / CHECKPOINT_NAME
    sha = save_checkpoint(model, path, {"config": "bevfusion-tiny"})
    assert len(sha) == 64 and path.stat().st_size < 10 * 2**20
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"state_dict", "meta"} and raw["meta"]["sparse_layout"] == "spconv1"
    assert raw["state_dict"]["fuser.0.weight"].dtype == torch.float16
    assert raw["state_dict"]["encoders.camera.vtransform.frustum"].dtype == torch.float32

    with caplog.at_level(logging.INFO):
        loaded = load_model(cfg, path)
    theirs, ours = loaded.state_dict(), model.state_dict()
    assert theirs.keys() == ours.keys()
    for key, value in ours.items():
        assert theirs[key].dtype == value.dtype, key
        if value.is_floating_point():
            torch.testing.assert_close(theirs[key], value, rtol=1e-3, atol=1e-4, msg=key)
        else:
            assert torch.equal(theirs[key], value), key
    assert torch.equal(theirs["encoders.camera.vtransform.frustum"], ours["encoders.camera.vtransform.frustum"])


def test_detection_measure_counts_matches_within_two_metres():
    measure = DetectionMeasure(["car", "pedestrian"], score_threshold=0.3)
    boxes = {
        "center": torch.tensor([[0.0, 0.0, 1.0], [10.0, 1.5, 1.0], [10.0, 0.0, 1.0], [30.0, 0.0, 1.0], [5.0, 5.0, 1.0]]),
        "score": torch.tensor([0.9, 0.8, 0.7, 0.2, 0.6]),
        "label": torch.tensor([0, 0, 0, 0, 1]),
    }
    gt_centers = torch.tensor([[1.5, 0.5, 1.0], [10.0, 0.0, 1.0], [5.0, 7.5, 1.0]])
    gt_labels = torch.tensor([0, 0, 1])
    measure.add(boxes, gt_centers, gt_labels)
    summary = measure.summary()["per_class"]
    # car: 3 above threshold; (0,0) and (10,1.5) match, (10,0) finds its gt taken -> FP
    assert summary["car"] == {"gt": 2, "predicted": 3, "tp": 2, "precision": 0.6667, "recall": 1.0}
    # pedestrian: 2.5 m away -> a miss and a false positive
    assert summary["pedestrian"] == {"gt": 1, "predicted": 1, "tp": 0, "precision": 0.0, "recall": 0.0}


# --------------------------------------------------------------------------- embedded default
@pytest.fixture
def package_checkpoints(tmp_path, monkeypatch):
    """Point the embedded-checkpoint folder at an empty temporary one."""
    from bevfusion_ptq.model import embedded

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    monkeypatch.setattr(embedded, "CHECKPOINT_DIR", folder)
    embedded._warn_missing.cache_clear()
    return folder


def test_default_without_the_embedded_file_falls_back_to_random_with_a_warning(package_checkpoints, caplog):
    from bevfusion_ptq.params import PTQParams
    from bevfusion_ptq.pipeline.inputs import prepare_checkpoint

    with caplog.at_level(logging.WARNING):
        ref = prepare_checkpoint(PTQParams())
    assert ref.generated and ref.source == "random"
    assert "embedded checkpoint" in caplog.text and "RANDOM" in caplog.text


def test_default_uses_the_embedded_file_and_random_stays_available(package_checkpoints, tmp_path):
    from bevfusion_ptq.hashing import file_sha256
    from bevfusion_ptq.model.checkpoint import make_checkpoint
    from bevfusion_ptq.params import PTQParams
    from bevfusion_ptq.pipeline.inputs import _checkpoint_identity, prepare_checkpoint

    path = package_checkpoints / "bevfusion-tiny.pth"
    make_checkpoint(path, load_config("bevfusion-tiny"), seed=5)
    (package_checkpoints / "bevfusion-tiny.json").write_text(json.dumps({"sha256": file_sha256(path)}))

    ref = prepare_checkpoint(PTQParams())
    assert (ref.path, ref.generated, ref.source) == (str(path), False, "embedded:bevfusion-tiny.pth")
    random_ref = prepare_checkpoint(PTQParams(checkpoint="random"))
    assert random_ref.generated and random_ref.source == "random" and random_ref.sha256 != ref.sha256
    assert "embedded" in _checkpoint_identity(PTQParams())
    assert "random" in _checkpoint_identity(PTQParams(checkpoint="random"))
    # bevfusion-r50 ships no trained weights: its default stays random
    r50 = _checkpoint_identity(PTQParams(config="bevfusion-r50"))
    assert "random" in r50 and r50 == _checkpoint_identity(PTQParams(config="bevfusion-r50", checkpoint="random"))


def test_embedded_file_that_does_not_match_its_record_is_refused(package_checkpoints):
    from bevfusion_ptq.errors import CheckpointError
    from bevfusion_ptq.params import PTQParams
    from bevfusion_ptq.pipeline.inputs import prepare_checkpoint

    path = package_checkpoints / "bevfusion-tiny.pth"
    path.write_bytes(b"not the recorded file")
    (package_checkpoints / "bevfusion-tiny.json").write_text(json.dumps({"sha256": "0" * 64}))
    with pytest.raises(CheckpointError, match="records"):
        prepare_checkpoint(PTQParams())


def test_shipped_record_matches_the_shipped_checkpoint():
    """Once the trained file is committed, its record beside it must describe it."""
    from bevfusion_ptq.hashing import file_sha256
    from bevfusion_ptq.model.embedded import CHECKPOINT_DIR

    path = CHECKPOINT_DIR / "bevfusion-tiny.pth"
    if not path.is_file():
        pytest.skip("the trained bevfusion-tiny checkpoint is not committed yet")
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["sha256"] == file_sha256(path)
    assert path.stat().st_size <= 10 * 10**6
    assert {"generator", "training_command"} <= record.keys()
