"""Choose which keyframes calibrate.

The reference takes the first N batches of a shuffled (CBGS-resampled) train loader; its
maintainers advise about 400 *distinct* keyframes, because consecutive frames of one scene
are nearly the same picture and calibrate like far fewer samples. Two strategies:

- ``spread`` (default): N distinct keyframes spread evenly over the scenes. Every scene gets
  an equal share (a short scene gives what it has, the rest goes to the others); inside a
  scene the share is taken at evenly spaced positions with a seeded phase, so picks are as far
  apart in time as they can be. When N is smaller than the number of scenes, N scenes are
  taken evenly spaced along the timeline. The returned order interleaves the scenes, so the
  first batches already cover the whole set.
- ``shuffle``: the reference's order: a seeded permutation of all keyframes, first N (without
  CBGS duplicates, so all distinct).

Both depend only on (scene keys, N, seed): same inputs, same tokens, on any machine.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bevfusion_ptq.errors import ConfigError

SAMPLINGS: tuple[str, ...] = ("spread", "shuffle")


def choose_samples(scene_keys: Sequence[str], num_samples: int, sampling: str = "spread", seed: int = 0) -> list[int]:
    """Indices (into the time-sorted infos) of the chosen keyframes, in calibration order.

    ``scene_keys[i]`` names the scene of keyframe ``i``; keyframes are in time order. The caller
    checks that ``num_samples`` does not exceed the number of keyframes.
    """
    if sampling not in SAMPLINGS:
        raise ConfigError(f"unknown sampling {sampling!r}; choose one of {list(SAMPLINGS)}")
    total = len(scene_keys)
    if not 0 < num_samples <= total:
        raise ValueError(f"num_samples must be in 1..{total}, got {num_samples}")
    rng = np.random.default_rng(seed)
    if sampling == "shuffle":
        return [int(i) for i in rng.permutation(total)[:num_samples]]

    scenes: dict[str, list[int]] = {}
    for index, key in enumerate(scene_keys):
        scenes.setdefault(key, []).append(index)
    members = sorted(scenes.values(), key=lambda idx: idx[0])  # scenes in time order
    quotas = _equal_shares([len(m) for m in members], num_samples, rng)

    picked: list[tuple[float, int, int]] = []  # (fraction through its scene, scene, index)
    for scene_no, (frames, quota) in enumerate(zip(members, quotas, strict=True)):
        if quota == 0:
            continue
        phase = rng.random()
        n = len(frames)
        for i in range(quota):
            # floor((i + phase) * n / quota) is strictly increasing in i because n >= quota.
            picked.append(((i + 0.5) / quota, scene_no, frames[int((i + phase) * n / quota)]))
    picked.sort()
    return [index for _, _, index in picked]


def _equal_shares(sizes: list[int], total: int, rng: np.random.Generator) -> list[int]:
    """Split ``total`` over scenes as evenly as their sizes allow (water filling)."""
    quotas = [0] * len(sizes)
    remaining = total
    while remaining:
        open_scenes = [i for i, size in enumerate(sizes) if quotas[i] < size]
        share = remaining // len(open_scenes)
        if share == 0:
            # Fewer samples left than open scenes: evenly spaced scenes, seeded phase.
            step = len(open_scenes) / remaining
            phase = rng.random()
            for k in range(remaining):
                quotas[open_scenes[int((k + phase) * step)]] += 1
            break
        for i in open_scenes:
            add = min(share, sizes[i] - quotas[i])
            quotas[i] += add
            remaining -= add
    return quotas
