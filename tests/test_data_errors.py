"""Bad input gets a DatasetError that names the file and the field."""

from __future__ import annotations

import logging
import pickle
import re

import numpy as np
import pytest
from data_helpers import TINY_DATA, generated_tree, linked_copy, load_infos, make_real, save_infos
from PIL import Image

from bevfusion_ptq.data import build_calibration_set
from bevfusion_ptq.errors import ConfigError, DatasetError

INFO = "nuscenes_infos_train.pkl"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return generated_tree(tmp_path_factory)


@pytest.fixture
def copy(tree, tmp_path):
    return linked_copy(tree, tmp_path / "copy")


def chosen(root, n=2, **kwargs):
    return build_calibration_set(root, None, TINY_DATA, num_samples=n, **kwargs)


def test_missing_data_file(copy):
    image = chosen(copy).records[0].cameras[1].image_path
    image.unlink()
    with pytest.raises(DatasetError) as err:
        chosen(copy)
    assert str(image) in str(err.value) and "cams.CAM_FRONT_RIGHT.data_path" in str(err.value)


def test_missing_info_file(tree, tmp_path):
    with pytest.raises(DatasetError, match="info file not found: .*nope.pkl"):
        build_calibration_set(tree, tmp_path / "nope.pkl", TINY_DATA, num_samples=1)


def test_truncated_lidar_file(copy):
    record = chosen(copy).records[0]
    sweep = make_real(record.sweeps[0].path)
    sweep.write_bytes(sweep.read_bytes()[:-3])
    with pytest.raises(DatasetError) as err:
        chosen(copy)
    message = str(err.value)
    assert str(sweep) in message and "sweeps[0].data_path" in message and "multiple of 20" in message


def test_truncated_lidar_file_found_while_loading(copy):
    """A file truncated after the set was built (or on a flaky disk) still fails clearly."""
    cset = chosen(copy)
    lidar = make_real(cset.records[0].lidar_path)
    lidar.write_bytes(lidar.read_bytes()[:-8])
    with pytest.raises(DatasetError, match=f"{re.escape(str(lidar))}.*truncated"):
        cset.dataset()[0]


@pytest.mark.parametrize(
    "field, remove",
    [
        ("cams", lambda info: info.pop("cams")),
        ("cams.CAM_BACK.sensor2lidar_rotation", lambda info: info["cams"]["CAM_BACK"].pop("sensor2lidar_rotation")),
        ("sweeps.0.timestamp", lambda info: info["sweeps"][0].pop("timestamp")),
        ("lidar2ego_rotation", lambda info: info.pop("lidar2ego_rotation")),
    ],
)
def test_info_field_absent(copy, field, remove):
    payload = load_infos(copy / INFO)
    for info in payload["infos"]:
        if info["sweeps"]:  # the first keyframe of a scene has none
            remove(info)
    save_infos(copy / INFO, payload)
    with pytest.raises(DatasetError) as err:
        chosen(copy, n=4)
    message = str(err.value)
    assert INFO in message and f"field '{field}' is absent" in message and "token" in message


def test_info_file_of_another_kind(copy):
    with open(copy / INFO, "wb") as fh:
        pickle.dump({"samples": []}, fh)
    with pytest.raises(DatasetError, match="field 'infos' .* or 'data_list' .* is absent"):
        chosen(copy)


def test_fewer_samples_than_batches(tree):
    with pytest.raises(DatasetError, match=r"has only 8 samples, fewer than the 400 calibration batches"):
        chosen(tree, n=400)


def test_wrong_image_size_is_resized_with_a_warning(copy, caplog):
    cset = chosen(copy)
    image_path = make_real(cset.records[0].cameras[0].image_path)
    with Image.open(image_path) as im:
        im.resize((800, 450)).save(image_path, quality=90)
    with caplog.at_level(logging.WARNING, logger="bevfusion_ptq.data.loading"):
        sample = cset.dataset()[0]
    assert sample["img"].shape == (6, 3, 128, 352)
    assert any(str(image_path) in r.getMessage() and "800x450" in r.getMessage() for r in caplog.records)


def test_nan_in_points_is_rejected(copy):
    cset = chosen(copy)
    lidar = make_real(cset.records[0].lidar_path)
    points = np.fromfile(lidar, dtype=np.float32).reshape(-1, 5)
    points[10, 3] = np.nan
    points.tofile(lidar)
    with pytest.raises(DatasetError, match=re.escape(f"{lidar} has 1 non-finite point values (columns [3])")):
        cset.dataset()[0]


def test_bad_data_config():
    with pytest.raises(ConfigError, match="'image_size' is missing"):
        build_calibration_set(".", None, {"point_cloud_range": [0] * 6}, num_samples=1)
    with pytest.raises(ConfigError, match="unknown data pipeline"):
        build_calibration_set(".", None, TINY_DATA, num_samples=1, pipeline="train")
