"""Calibration loader throughput (samples/s) for the tiny and R50 input sizes.

    python bench/data_loading.py [--data-root DIR] [--samples 24] [--workers 2]

Without ``--data-root`` a nuScenes-format tree is generated in a temporary folder (1600x900
JPEGs, 32-beam lidar with 9 sweeps, like nuScenes' files). The first batch is not timed: it
pays for starting the workers. Each figure is the whole per-sample path: 6 JPEG decodes,
resize and crop, normalisation, 10 lidar files, merge and range filter, collate.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from bevfusion_ptq.data import build_calibration_set, make_dataset

# The shipped configs' data sections, used when mmengine or the configs are unavailable.
FALLBACK: dict[str, dict[str, Any]] = {
    "bevfusion-tiny": {
        "image_size": [128, 352],
        "test_resize": 0.24,
        "point_cloud_range": [-54.0, -54.0, -5.0, 54.0, 54.0, 3.0],
    },
    "bevfusion-r50": {
        "image_size": [256, 704],
        "test_resize": 0.48,
        "point_cloud_range": [-54.0, -54.0, -5.0, 54.0, 54.0, 3.0],
    },
}


def data_section(name: str) -> Any:
    try:
        from bevfusion_ptq.model.config import load_config

        return load_config(name).data
    except Exception as exc:  # noqa: BLE001 - a benchmark falls back rather than fails
        logging.getLogger(__name__).warning("using built-in data values for %s (%s)", name, exc)
        return FALLBACK[name]


def measure(root: Path, data_cfg: Any, samples: int, workers: int, pipeline: str) -> tuple[float, int]:
    cset = build_calibration_set(root, None, data_cfg, num_samples=samples, pipeline=pipeline)
    loader = cset.loader(num_workers=workers, pin_memory=False)
    iterator = iter(loader)
    next(iterator)
    started = time.perf_counter()
    count = sum(1 for _ in iterator)
    return count / (time.perf_counter() - started), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pipeline", default="test", choices=["test", "train-aug"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_root
        if root is None:
            root = Path(tmp)
            made = make_dataset(root, scenes=4, frames=10, seed=0)
            print(f"generated {made.num_train} train keyframes in {made.seconds:.1f} s")
        for name in ("bevfusion-tiny", "bevfusion-r50"):
            cfg = data_section(name)
            rate, count = measure(root, cfg, args.samples, args.workers, args.pipeline)
            h, w = cfg["image_size"]
            print(
                f"{name:16s} {h}x{w}  {args.pipeline:9s} workers={args.workers}: {rate:6.2f} samples/s ({count} timed)"
            )


if __name__ == "__main__":
    main()
