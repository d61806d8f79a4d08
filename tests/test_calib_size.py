"""How many calibration batches a run takes: the reference's 300 on a real tree, capped at
what the tree holds; a small default on the generated demo tree."""

from __future__ import annotations

import logging

import pytest

from bevfusion_ptq.errors import DatasetError
from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.pipeline import prepare_dataset
from flows.cli import build_parser
from tests.data_helpers import generated_tree

TRAIN_KEYFRAMES = 8  # generated_tree's default: 3 scenes x 4 frames, the last scene is val


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_real_tree_default_is_300_capped_at_its_keyframes(tmp_path_factory, caplog) -> None:
    params = PTQParams(data_root=str(generated_tree(tmp_path_factory)), device="cpu")
    assert params.calib_batches is None and params.requested_calib_batches == 300
    with caplog.at_level(logging.WARNING, logger="bevfusion_ptq"):
        data = prepare_dataset(params)
    assert len(data.tokens) == TRAIN_KEYFRAMES == len(set(data.tokens))
    warned = _warnings(caplog)
    assert any(f"holds {TRAIN_KEYFRAMES} distinct keyframes" in w and "300" in w for w in warned), warned
    assert any("fewer than 100" in w for w in warned), warned


def test_explicit_request_beyond_the_tree_fails(tmp_path_factory) -> None:
    params = PTQParams(data_root=str(generated_tree(tmp_path_factory)), calib_batches=TRAIN_KEYFRAMES + 1)
    with pytest.raises(DatasetError, match=f"only {TRAIN_KEYFRAMES} samples"):
        prepare_dataset(params)


def test_few_batches_on_a_real_tree_are_warned_about(tmp_path_factory, caplog) -> None:
    params = PTQParams(data_root=str(generated_tree(tmp_path_factory)), calib_batches=3)
    with caplog.at_level(logging.WARNING, logger="bevfusion_ptq"):
        data = prepare_dataset(params)
    assert len(data.tokens) == 3
    warned = _warnings(caplog)
    assert any("calibrating on 3 keyframes of a real tree" in w for w in warned), warned
    assert not any("distinct keyframes, fewer than the default" in w for w in warned)


def test_demo_tree_default_stays_small() -> None:
    assert PTQParams().requested_calib_batches == 8
    assert PTQParams(calib_batches=5).requested_calib_batches == 5


def test_help_and_form_state_the_default() -> None:
    description = PTQParams.model_fields["calib_batches"].description
    assert "300" in description and "8 on the generated demo tree" in description
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    assert "300" in run.format_help()
    schema = PTQParams.model_json_schema()["properties"]["calib_batches"]
    assert "300" in schema["description"]  # the Prefect UI form shows the schema's description
