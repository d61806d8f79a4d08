"""Calibration keyframes: deterministic, distinct, spread over scenes."""

from __future__ import annotations

import numpy as np
import pytest
from data_helpers import TINY_DATA, generated_tree, load_infos, save_infos

from bevfusion_ptq.data import build_calibration_set, read_info_file
from bevfusion_ptq.data.sampling import choose_samples
from bevfusion_ptq.errors import ConfigError

# Four scenes of 10, 10, 3 and 10 keyframes, in time order.
SCENES = ["a"] * 10 + ["b"] * 10 + ["c"] * 3 + ["d"] * 10


def test_spread_is_deterministic_and_distinct():
    for n in (1, 3, 8, 20, 33):
        first = choose_samples(SCENES, n, "spread", seed=5)
        assert first == choose_samples(SCENES, n, "spread", seed=5)
        assert len(set(first)) == n
    assert choose_samples(SCENES, 8, "spread", seed=0) != choose_samples(SCENES, 8, "spread", seed=1)


def test_spread_takes_equal_shares_far_apart():
    chosen = choose_samples(SCENES, 8, "spread", seed=0)
    per_scene = {s: sorted(i for i in chosen if SCENES[i] == s) for s in "abcd"}
    assert [len(v) for v in per_scene.values()] == [2, 2, 2, 2]
    for scene in "abd":  # 10 frames, 2 picks: at least 4 frames apart
        assert per_scene[scene][1] - per_scene[scene][0] >= 4
    # A short scene gives what it has; the others make up the difference.
    counts = [sum(SCENES[i] == s for i in choose_samples(SCENES, 24, "spread", seed=0)) for s in "abcd"]
    assert counts == [7, 7, 3, 7]
    # The order interleaves scenes: the first four picks come from four scenes.
    assert len({SCENES[i] for i in chosen[:4]}) == 4


def test_fewer_samples_than_scenes_spreads_over_the_timeline():
    chosen = choose_samples(SCENES, 2, "spread", seed=0)
    assert len({SCENES[i] for i in chosen}) == 2


def test_shuffle_is_a_seeded_permutation():
    a = choose_samples(SCENES, 10, "shuffle", seed=3)
    assert a == choose_samples(SCENES, 10, "shuffle", seed=3) and len(set(a)) == 10
    assert a != choose_samples(SCENES, 10, "shuffle", seed=4)
    with pytest.raises(ConfigError, match="sampling"):
        choose_samples(SCENES, 10, "random", seed=3)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return generated_tree(tmp_path_factory)


def test_calibration_set_spreads_over_the_generated_scenes(tree):
    a = build_calibration_set(tree, None, TINY_DATA, num_samples=4)
    b = build_calibration_set(tree, None, TINY_DATA, num_samples=4)
    assert a.tokens == b.tokens and len(set(a.tokens)) == 4
    scenes = [r.scene for r in a.records]
    assert len(set(scenes)) == 2 and scenes[0] != scenes[1]  # 2 train scenes of 4 keyframes
    assert a.manifest()["scenes"] == 2 and a.manifest()["tokens"] == a.tokens


def test_scenes_from_time_gaps_match_scene_tokens(tree, tmp_path):
    payload = load_infos(tree / "nuscenes_infos_train.pkl")
    with_tokens = read_info_file(tree / "nuscenes_infos_train.pkl").scenes()
    for info in payload["infos"]:
        del info["scene_token"]  # BEVFusion's converter writes none
    save_infos(tmp_path / "infos.pkl", payload)
    from_gaps = read_info_file(tmp_path / "infos.pkl").scenes()
    assert len(set(with_tokens)) == len(set(from_gaps)) == 2
    # Same partition, different names.
    assert np.array_equal(np.unique(with_tokens, return_inverse=True)[1], np.unique(from_gaps, return_inverse=True)[1])
