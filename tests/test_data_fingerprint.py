"""The calibration fingerprint changes when the data or the chosen tokens change, and only then."""

from __future__ import annotations

import shutil

import pytest
from data_helpers import TINY_DATA, generated_tree, linked_copy, load_infos, make_real, save_infos

from bevfusion_ptq.data import build_calibration_set


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return generated_tree(tmp_path_factory)


def fingerprint(root, data_cfg=TINY_DATA, **kwargs):
    kwargs = {"num_samples": 4, **kwargs}
    return build_calibration_set(root, None, data_cfg, **kwargs).fingerprint


def test_same_inputs_same_fingerprint_anywhere(tree, tmp_path):
    base = fingerprint(tree)
    assert fingerprint(tree) == base
    moved = tmp_path / "elsewhere"
    shutil.copytree(tree, moved)
    assert fingerprint(moved) == base
    # Values that do not change the batch do not change the fingerprint.
    assert fingerprint(tree, {**TINY_DATA, "voxel_size": [0.2, 0.2, 0.4]}) == base
    assert fingerprint(tree, seed=0, pipeline="test") == base


def test_chosen_tokens_change_it(tree):
    base_set = build_calibration_set(tree, None, TINY_DATA, num_samples=4)
    assert fingerprint(tree, num_samples=3) != base_set.fingerprint
    other_seed = build_calibration_set(tree, None, TINY_DATA, num_samples=4, seed=7)
    assert (other_seed.tokens == base_set.tokens) == (other_seed.fingerprint == base_set.fingerprint)
    shuffled = build_calibration_set(tree, None, TINY_DATA, num_samples=4, sampling="shuffle")
    assert shuffled.tokens != base_set.tokens and shuffled.fingerprint != base_set.fingerprint


def test_tensor_settings_change_it(tree):
    base = fingerprint(tree)
    assert fingerprint(tree, {**TINY_DATA, "test_resize": 0.25}) != base
    assert fingerprint(tree, {**TINY_DATA, "point_cloud_range": [-30, -30, -5, 30, 30, 3]}) != base
    assert fingerprint(tree, pipeline="train-aug") != base
    assert fingerprint(tree, pipeline="train-aug", seed=1) != fingerprint(tree, pipeline="train-aug", seed=2)


def test_data_changes_change_it(tree, tmp_path):
    base = fingerprint(tree)
    copy = linked_copy(tree, tmp_path / "copy")
    assert fingerprint(copy) == base

    # An edit to the info file, even of a sample we do not use.
    payload = load_infos(copy / "nuscenes_infos_train.pkl")
    payload["infos"][-1]["location"] = "elsewhere"
    save_infos(copy / "nuscenes_infos_train.pkl", payload)
    edited = fingerprint(copy)
    assert edited != base

    # A data file of a chosen sample replaced by a different one.
    cset = build_calibration_set(copy, None, TINY_DATA, num_samples=4)
    image = make_real(cset.records[0].cameras[2].image_path)
    image.write_bytes(image.read_bytes() + b"\0" * 16)
    assert fingerprint(copy) != edited
