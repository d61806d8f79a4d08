"""Generate one nuScenes-layout tree for training the demo model, in parallel.

``bevfusion_ptq.data.make_dataset`` writes one seeded stream of scenes; here many of them
(shards) run at once, one seed each, and are merged into a single tree:

- train: shards with seeds ``train_seed + i`` -> ``nuscenes_infos_train.pkl``;
- val: shards with seeds ``val_seed + i`` (other seeds, hence other scenes) ->
  ``nuscenes_infos_val.pkl``.

Each shard is written under ``<root>/.shards/<split>-<seed>/`` and its files are then moved
into ``<root>/samples`` and ``<root>/sweeps``: file names carry timestamps that
``make_dataset`` separates by 10^4 s per seed, so shards never collide. Info paths are the
``./data/nuscenes/samples/...`` form, resolved on the data root, so the merged infos need no
rewriting. Same arguments, same bytes (each shard is deterministic for its seed, and shards
are merged in seed order).

    python tools/make_training_tree.py /data/tree --train-shards 59 --val-shards 5 --workers 16
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("make_training_tree")

SHARDS_DIR = ".shards"


def _make_shard(root: str, split: str, seed: int, scenes: int, frames: int) -> tuple[str, int, float]:
    """One ``make_dataset`` call (all scenes to its train info); returns (dir, keyframes, seconds)."""
    from bevfusion_ptq.data.generate import make_dataset

    out = Path(root) / SHARDS_DIR / f"{split}-{seed}"
    if out.exists():
        shutil.rmtree(out)
    result = make_dataset(out, scenes=scenes, frames=frames, seed=seed, val_scenes=0)
    return str(out), result.num_train, result.seconds


def _merge(root: Path, shard_dirs: list[Path], info_name: str) -> int:
    """Move the shards' files into ``root`` and write their infos, concatenated, as ``info_name``."""
    infos: list[dict] = []
    metadata: dict = {}
    for shard in shard_dirs:
        with open(shard / "nuscenes_infos_train.pkl", "rb") as fh:
            payload = pickle.load(fh)
        infos.extend(payload["infos"])
        metadata = dict(payload["metadata"], generator_seeds=[])
        for top in ("samples", "sweeps"):
            for folder in sorted((shard / top).iterdir()):
                target = root / top / folder.name
                target.mkdir(parents=True, exist_ok=True)
                for f in folder.iterdir():
                    os.replace(f, target / f.name)
    metadata["generator_seeds"] = [int(d.name.rsplit("-", 1)[1]) for d in shard_dirs]
    with open(root / info_name, "wb") as fh:
        pickle.dump({"infos": infos, "metadata": metadata}, fh, protocol=pickle.HIGHEST_PROTOCOL)
    return len(infos)


def make_training_tree(
    root: str | Path,
    train_shards: int = 59,
    val_shards: int = 5,
    scenes_per_shard: int = 4,
    frames: int = 10,
    train_seed: int = 1000,
    val_seed: int = 9000,
    workers: int | None = None,
) -> dict:
    """Write the tree; returns the settings and counts (recorded beside the checkpoint)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    jobs = [("train", train_seed + i) for i in range(train_shards)] + [("val", val_seed + i) for i in range(val_shards)]
    workers = workers or os.cpu_count() or 1
    shard_dirs: dict[str, list[Path]] = {"train": [], "val": []}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [(split, pool.submit(_make_shard, str(root), split, seed, scenes_per_shard, frames)) for split, seed in jobs]
        for split, future in futures:
            path, count, seconds = future.result()
            shard_dirs[split].append(Path(path))
            log.info("shard %s: %d keyframes in %.1f s", Path(path).name, count, seconds)
    counts = {
        "train": _merge(root, shard_dirs["train"], "nuscenes_infos_train.pkl"),
        "val": _merge(root, shard_dirs["val"], "nuscenes_infos_val.pkl"),
    }
    shutil.rmtree(root / SHARDS_DIR)
    summary = {
        "generator": "bevfusion_ptq.data.make_dataset, one call per shard (tools/make_training_tree.py)",
        "train_shards": train_shards,
        "val_shards": val_shards,
        "scenes_per_shard": scenes_per_shard,
        "frames_per_scene": frames,
        "train_seeds": [train_seed, train_seed + train_shards - 1],
        "val_seeds": [val_seed, val_seed + val_shards - 1] if val_shards else [],
        "train_keyframes": counts["train"],
        "val_keyframes": counts["val"],
        "train_scenes": train_shards * scenes_per_shard,
        "val_scenes": val_shards * scenes_per_shard,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (root / "tree.json").write_text(json.dumps(summary, indent=2))
    log.info("tree %s: %d train + %d val keyframes in %.1f s", root, counts["train"], counts["val"], summary["seconds"])
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="where to write the tree")
    ap.add_argument("--train-shards", type=int, default=59)
    ap.add_argument("--val-shards", type=int, default=5)
    ap.add_argument("--scenes-per-shard", type=int, default=4)
    ap.add_argument("--frames", type=int, default=10, help="keyframes per scene (0.5 s apart)")
    ap.add_argument("--train-seed", type=int, default=1000)
    ap.add_argument("--val-seed", type=int, default=9000)
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    ns = ap.parse_args(argv)
    if ns.val_shards and ns.val_seed < ns.train_seed + ns.train_shards and ns.val_seed + ns.val_shards > ns.train_seed:
        ap.error("val seeds overlap train seeds: val scenes would repeat train scenes")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("bevfusion_ptq").setLevel(logging.WARNING)
    summary = make_training_tree(
        ns.root, ns.train_shards, ns.val_shards, ns.scenes_per_shard, ns.frames, ns.train_seed, ns.val_seed, ns.workers
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
