"""A version reloads from its own config.json, whatever config file it was made from."""

from __future__ import annotations

import json
import shutil

from bevfusion_ptq.config_files import CONFIG_DIR
from bevfusion_ptq.model.builder import build_model
from bevfusion_ptq.model.config import load_config
from bevfusion_ptq.preflight import check_config


def test_config_json_of_a_custom_py_config_builds_the_same_model(tmp_path):
    custom = tmp_path / "my_tiny.py"
    shutil.copyfile(CONFIG_DIR / "bevfusion_tiny.py", custom)
    resolved = load_config(custom)
    version_config = tmp_path / "version" / "config.json"
    version_config.parent.mkdir()
    # As the save stage writes it.
    version_config.write_text(json.dumps(resolved.to_dict(), indent=2, sort_keys=True) + "\n")
    custom.unlink()  # the original file is gone where the version is reloaded

    assert check_config(str(version_config)) == version_config
    reloaded = build_model(load_config(version_config)).state_dict()
    original = build_model(load_config("bevfusion-tiny")).state_dict()
    assert {k: v.shape for k, v in reloaded.items()} == {k: v.shape for k, v in original.items()}
