"""nuscenes-devkit on generated trees: the tables load, ground truth scores mAP 1, errors cost.

The ground-truth-as-predictions check sends the info files' boxes (lidar frame, BEVFusion's
converter convention) through the same conversion the model's decoded boxes take, and the
devkit scores them against the tables, which the generator wrote from the world's true
object tracks. A wrong centre, size order, yaw or frame in the conversion would cost mAP or
raise a TP error here.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
from data_helpers import generated_tree

from bevfusion_ptq.data import read_info_file
from bevfusion_ptq.data.infos import NUSCENES_CLASSES
from bevfusion_ptq.data.nuscenes_tables import GENERATED_VERSION, TABLE_NAMES
from bevfusion_ptq.errors import DatasetError
from bevfusion_ptq.evaluation import boxes_from_internal, results_document, sample_results
from bevfusion_ptq.evaluation.database import (
    check_tables, open_nuscenes, resolve_version, split_for, split_sample_tokens,
)
from bevfusion_ptq.evaluation.metrics import evaluate_detections
from bevfusion_ptq.evaluation.results import attribute_name


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return generated_tree(tmp_path_factory, scenes=3, frames=4)


@pytest.fixture(scope="module")
def nusc(tree):
    return open_nuscenes(tree, resolve_version(tree, None))


@pytest.fixture(scope="module")
def val_records(tree):
    info = read_info_file(tree / "nuscenes_infos_val.pkl")
    scenes = info.scenes()
    return [info.record(i, tree, scenes[i]) for i in range(len(info))]


@pytest.fixture(scope="module")
def lidar_points(tree) -> dict[str, np.ndarray]:
    """The generator's own count of lidar returns per info box, by sample token."""
    info = read_info_file(tree / "nuscenes_infos_val.pkl")
    return {e["token"]: np.asarray(e["num_lidar_pts"]) for e in info.entries}


def _gt_results(records, points, edit=None) -> dict[str, list[dict]]:
    """The info files' ground truth as a submission; ``edit(boxes dict)`` perturbs it first.

    Boxes the lidar did not hit are left out, as the devkit drops them from the ground truth
    (a submitted one would count as a false positive).
    """
    out = {}
    for r in records:
        seen = points[r.token] > 0
        names = [n for n, s in zip(r.gt_names, seen) if s]
        boxes = boxes_from_internal(r.gt_boxes[seen], names, r.gt_velocity[seen], NUSCENES_CLASSES)
        if edit is not None:
            boxes = edit(boxes)
        out[r.token] = sample_results(r.token, boxes, r.lidar2ego, r.ego2global, NUSCENES_CLASSES)
    return out


def _evaluate(nusc, records, results, tmp_path, tokens=None, render=False):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results_document(results)))
    tokens = tokens or [r.token for r in records]
    return evaluate_detections(nusc, path, "val", tokens, tmp_path / "eval", render=render)


def test_devkit_loads_the_generated_tables(tree, nusc, val_records):
    assert resolve_version(tree, None) == GENERATED_VERSION == "v1.0-trainval"
    assert split_for(GENERATED_VERSION, None) == "val"
    assert {f"{t}.json" for t in TABLE_NAMES} <= {p.name for p in (tree / GENERATED_VERSION).iterdir()}
    # The val split of the devkit is exactly the val info file's keyframes; train is the rest.
    assert sorted(split_sample_tokens(nusc, "val")) == sorted(r.token for r in val_records)
    train = read_info_file(tree / "nuscenes_infos_train.pkl")
    assert sorted(split_sample_tokens(nusc, "train")) == sorted(train.token(i) for i in range(len(train)))
    # Every keyframe has its lidar and six cameras, with files that exist.
    for sample in nusc.sample:
        assert len(sample["data"]) == 7
        for sd_token in sample["data"].values():
            assert (tree / nusc.get("sample_data", sd_token)["filename"]).is_file()
    # Sweeps chain to keyframes; velocities from the annotation chain are finite.
    lidar = [sd for sd in nusc.sample_data if sd["channel"] == "LIDAR_TOP"]
    assert sum(not sd["is_key_frame"] for sd in lidar) > sum(sd["is_key_frame"] for sd in lidar)
    ann = nusc.sample_annotation[0]
    assert np.isfinite(nusc.box_velocity(ann["token"])).all()
    # num_lidar_pts counts the points of the written keyframe: objects the lidar hit have
    # points, and the counts agree with the generator's own hit counts within a few points.
    info = read_info_file(tree / "nuscenes_infos_val.pkl")
    entry = info.entries[0]
    anns = [nusc.get("sample_annotation", a) for a in nusc.get("sample", entry["token"])["anns"]]
    assert sum(a["num_lidar_pts"] for a in anns) >= int(np.sum(entry["num_lidar_pts"]))
    assert sum(a["num_lidar_pts"] > 0 for a in anns) == int(np.sum(np.asarray(entry["num_lidar_pts"]) > 0))


def test_ground_truth_as_predictions_scores_map_one(nusc, val_records, lidar_points, tmp_path):
    result = _evaluate(nusc, val_records, _gt_results(val_records, lidar_points), tmp_path, render=True)
    s = result.summary
    assert result.gt_boxes > 10 and result.pred_boxes >= result.gt_boxes
    present = [c for c, n in result.gt_per_class.items() if n]
    assert len(present) >= 4, result.gt_per_class
    assert all(s["mean_dist_aps"][c] > 0.99 for c in present), s["mean_dist_aps"]
    # The devkit averages over all ten classes, and a class without ground truth has AP 0.
    assert s["mean_ap"] == pytest.approx(len(present) / 10, abs=0.01)
    # TP errors of the classes present (absent ones score the worst error, 1, in the mean).
    assert _present_tp(result, "trans_err") < 0.01  # centre
    assert _present_tp(result, "scale_err") < 0.01  # w, l, h order
    assert _present_tp(result, "orient_err") < 0.01  # yaw and frame
    assert _present_tp(result, "vel_err") < 0.1  # true velocity vs the devkit's finite difference
    assert _present_tp(result, "attr_err") < 0.01
    tp_score = sum(1 - min(1.0, e) for e in s["tp_errors"].values())
    assert s["nd_score"] == pytest.approx((5 * s["mean_ap"] + tp_score) / 10)
    assert {Path(p).name for p in result.plots} == {"summary.png", *(f"dist_pr_{t}.png" for t in (0.5, 1.0, 2.0, 4.0))}
    # nuScenes matches in the ground plane only; the height must be right too (gravity centre).
    for r in val_records:
        anns = [nusc.get("sample_annotation", a) for a in nusc.get("sample", r.token)["anns"]]
        for box in _gt_results([r], lidar_points)[r.token]:
            nearest = min(anns, key=lambda a: np.linalg.norm(np.subtract(a["translation"], box["translation"])))
            assert np.allclose(nearest["translation"], box["translation"], atol=1e-3)
            assert np.allclose(nearest["size"], box["size"], atol=1e-3)


def _present_map(result) -> float:
    """mAP over the classes that have ground truth (the devkit's mAP counts absent ones as 0)."""
    present = [c for c, n in result.gt_per_class.items() if n]
    return float(np.mean([result.summary["mean_dist_aps"][c] for c in present]))


def _present_tp(result, metric: str) -> float:
    """A TP error averaged over the classes that have ground truth (NaN: not defined for the class)."""
    values = [result.summary["label_tp_errors"][c][metric] for c, n in result.gt_per_class.items() if n]
    return float(np.nanmean(values)) if not all(math.isnan(v) for v in values) else 0.0


def _shift_x(metres):
    def edit(b):
        b = copy.deepcopy(b)
        b["center"][:, 0] += metres
        return b

    return edit


def test_perturbed_boxes_lower_the_scores_as_expected(nusc, val_records, lidar_points, tmp_path):
    # 1.5 m off: a miss at the 0.5 and 1 m thresholds, a hit at 2 and 4 m -> mAP 0.5.
    shifted = _evaluate(nusc, val_records, _gt_results(val_records, lidar_points, _shift_x(1.5)), tmp_path / "a")
    assert _present_map(shifted) == pytest.approx(0.5, abs=0.02)
    for name, aps in shifted.summary["label_aps"].items():
        if not math.isnan(aps["4.0"]) and aps["4.0"] > 0:
            assert aps["0.5"] == 0 and aps["1.0"] == 0

    def turn(b):
        b = copy.deepcopy(b)
        b["yaw"] = b["yaw"] + np.pi / 2
        return b

    result = _evaluate(nusc, val_records, _gt_results(val_records, lidar_points, turn), tmp_path / "b")
    assert _present_map(result) > 0.99 and _present_tp(result, "orient_err") == pytest.approx(np.pi / 2, abs=0.01)
    assert _present_tp(result, "trans_err") < 0.01

    def swap_sizes(b):
        b = copy.deepcopy(b)
        b["size"] = b["size"][:, [1, 0, 2]]
        return b

    swapped = _evaluate(nusc, val_records, _gt_results(val_records, lidar_points, swap_sizes), tmp_path / "c")
    assert _present_tp(swapped, "scale_err") > 0.2

    def drop_half(b):
        keep = np.arange(len(b["score"])) % 2 == 0
        return {k: v[keep] for k, v in b.items()}

    halved = _evaluate(nusc, val_records, _gt_results(val_records, lidar_points, drop_half), tmp_path / "d")
    assert 0.2 < _present_map(halved) < 0.8


def test_a_subset_restricts_the_ground_truth(nusc, val_records, lidar_points, tmp_path):
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval

    from bevfusion_ptq.evaluation.metrics import CONFIG_NAME, _detection_eval_class

    # The subset evaluator on the whole split equals the devkit's own.
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results_document(_gt_results(val_records, lidar_points, _shift_x(0.7)))))
    cfg = config_factory(CONFIG_NAME)
    stock, _ = DetectionEval(nusc, cfg, str(path), "val", str(tmp_path / "s"), verbose=False).evaluate()
    tokens = [r.token for r in val_records]
    ours, _ = _detection_eval_class()(nusc, cfg, str(path), tokens, str(tmp_path / "o")).evaluate()
    stock_s, ours_s = stock.serialize(), ours.serialize()
    assert ours_s["mean_ap"] == stock_s["mean_ap"] and ours_s["nd_score"] == stock_s["nd_score"]

    # Half the keyframes, ground truth as predictions: still mAP 1 (the other half's boxes
    # are not counted as missed), and the stock evaluator refuses such a submission.
    half = val_records[::2]
    result = _evaluate(nusc, half, _gt_results(half, lidar_points), tmp_path / "h", tokens=[r.token for r in half])
    assert result.num_samples == len(half) < len(val_records) and _present_map(result) > 0.99
    path.write_text(json.dumps(results_document(_gt_results(half, lidar_points))))
    with pytest.raises(AssertionError, match="Samples in split"):
        DetectionEval(nusc, cfg, str(path), "val", str(tmp_path / "x"), verbose=False)


def test_samples_outside_the_split_are_refused(nusc, tree, tmp_path):
    train = read_info_file(tree / "nuscenes_infos_train.pkl")
    token = train.token(0)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results_document({token: []})))
    with pytest.raises(DatasetError, match="not in split 'val'"):
        evaluate_detections(nusc, path, "val", [token], tmp_path / "e", render=False)


def test_missing_tables_and_versions_fail_with_one_line(tree, tmp_path):
    with pytest.raises(DatasetError, match="no nuScenes tables found"):
        resolve_version(tmp_path, None)
    with pytest.raises(DatasetError, match="is not a directory"):
        check_tables(tmp_path, "v1.0-trainval")
    broken = tmp_path / "v1.0-mini"
    broken.mkdir()
    for name in TABLE_NAMES:
        if name not in ("sample_annotation", "map"):
            (broken / f"{name}.json").write_text("[]")
    assert resolve_version(tmp_path, None) == "v1.0-mini" and split_for("v1.0-mini", None) == "mini_val"
    with pytest.raises(DatasetError, match=r"tables missing: sample_annotation\.json, map\.json"):
        open_nuscenes(tmp_path, "v1.0-mini")
    with pytest.raises(DatasetError, match="does not belong"):
        split_for("v1.0-mini", "val")
    with pytest.raises(DatasetError, match="no annotated validation split"):
        split_for("v1.0-test", None)


def test_attributes_follow_class_and_motion():
    assert attribute_name("car", [3.0, 0.0]) == "vehicle.moving"
    assert attribute_name("car", [0.1, 0.0]) == "vehicle.parked"
    assert attribute_name("bus", [0.0, 0.0]) == "vehicle.stopped"
    assert attribute_name("bicycle", [0.0, 2.0]) == "cycle.with_rider"
    assert attribute_name("motorcycle", [0.0, 0.0]) == "cycle.without_rider"
    assert attribute_name("pedestrian", [1.0, 0.0]) == "pedestrian.moving"
    assert attribute_name("pedestrian", [0.0, 0.0]) == "pedestrian.standing"
    assert attribute_name("barrier", [5.0, 0.0]) == attribute_name("traffic_cone", [0, 0]) == ""


def test_boxes_go_to_the_global_frame():
    """One box by hand: lidar +y forward (lidar2ego turns -90 deg), ego heading +90 deg."""
    from bevfusion_ptq.data.geometry import quaternion_to_matrix, rigid, rot_z

    lidar2ego = rigid(rot_z(-np.pi / 2), (1.0, 0.0, 2.0))
    ego2global = rigid(rot_z(np.pi / 2), (100.0, 200.0, 0.0))
    boxes = {  # 4 m ahead of the lidar (+y), heading forward (yaw +90 deg in the lidar frame)
        "center": np.array([[0.0, 4.0, -1.0]]), "size": np.array([[4.5, 2.0, 1.6]]),
        "yaw": np.array([np.pi / 2]), "velocity": np.array([[0.0, 5.0]]),
        "score": np.array([0.9]), "label": np.array([0]),
    }  # fmt: skip
    (box,) = sample_results("t", boxes, lidar2ego, ego2global, NUSCENES_CLASSES)
    # ego: 5 m ahead (+x), 2 m - 1 m up; global: the ego faces +y, so ahead is +y.
    assert np.allclose(box["translation"], [100.0, 205.0, 1.0])
    assert box["size"] == [2.0, 4.5, 1.6]
    assert np.allclose(quaternion_to_matrix(box["rotation"]), rot_z(np.pi / 2))
    assert np.allclose(box["velocity"], [0.0, 5.0])
    assert box["detection_name"] == "car" and box["attribute_name"] == "vehicle.moving"
