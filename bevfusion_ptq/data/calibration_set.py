"""The calibration data stage: pick keyframes, fingerprint them, serve them through a loader.

:func:`build_calibration_set` is this stage's one entry point. It does all the cheap checks up
front (info fields of the chosen samples, every file present, lidar file sizes), so a bad tree
fails before a model is built, and returns a :class:`CalibrationSet`: the chosen tokens, a
fingerprint that the orchestration uses as a cache key, and a ``DataLoader`` factory.

Fingerprint: sha256 over the info file's sha256, the chosen tokens in order, the pipeline
name, the data-config values that change the tensors (image size, resize or augmentation
ranges, point-cloud range, sweeps, dims, normalisation), the seed when the pipeline is
``train-aug``, and the byte size of every file the chosen samples read. It therefore changes
when the info file, the choice, or a read file's size changes; it does not change when the
tree moves to another directory, when the sampling strategy or seed changes but picks the same
tokens, or when a config value that does not touch the batch (voxel size, model) changes.
File contents are not hashed (400 keyframes read ~3 GB); a file rewritten in place with the
same size is the one change it cannot see.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from bevfusion_ptq.data.batch import collate
from bevfusion_ptq.data.infos import SampleRecord, read_info_file
from bevfusion_ptq.data.pipeline import SamplePipeline
from bevfusion_ptq.data.sampling import choose_samples
from bevfusion_ptq.data.settings import DataSettings, check_pipeline
from bevfusion_ptq.errors import DatasetError, PTQError
from bevfusion_ptq.hashing import data_sha256

log = logging.getLogger(__name__)

DEFAULT_INFO_NAME = "nuscenes_infos_train.pkl"


class CalibrationDataset(Dataset):
    """Map-style dataset over the chosen records; item ``i`` is sample ``i`` of the set."""

    def __init__(self, records: tuple[SampleRecord, ...], pipeline: SamplePipeline):
        self.records = records
        self.pipeline = pipeline

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.pipeline(self.records[index], index)


@dataclass(frozen=True)
class CalibrationSet:
    """The chosen keyframes and how to load them; small and picklable (no tensors inside)."""

    data_root: Path
    info_path: Path
    info_sha256: str
    settings: DataSettings
    pipeline: str
    sampling: str
    seed: int
    records: tuple[SampleRecord, ...] = field(repr=False)
    fingerprint: str = ""

    @property
    def tokens(self) -> list[str]:
        return [r.token for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def dataset(self) -> CalibrationDataset:
        return CalibrationDataset(self.records, SamplePipeline(self.settings, self.pipeline, self.seed))

    def loader(
        self,
        num_workers: int = 2,
        pin_memory: bool | None = None,
        prefetch_factor: int = 4,
        persistent_workers: bool = False,
        start: int = 0,
    ) -> DataLoader:
        """Batch-size-1 loader in the set's order, from sample ``start`` on.

        Workers decode JPEGs while the model runs; ``pin_memory`` (default: when CUDA is
        available) lets :func:`~bevfusion_ptq.data.batch.move_batch` copy without blocking.
        ``start`` serves a resumed calibration the samples it has not seen; each keeps its
        position in the set, so seeded augmentations are those of an uninterrupted run.
        Workers end with the pass over the data unless ``persistent_workers`` (calibration
        reads the set once; a forked worker can hold as much memory as the process that
        forked it, so idle ones must not pile up in a long-lived worker process).
        """
        workers = max(0, int(num_workers))
        dataset = self.dataset()
        if start:
            dataset = Subset(dataset, range(start, len(dataset)))
        return _OwnErrorsLoader(
            dataset,
            batch_size=1,
            shuffle=False,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
            prefetch_factor=prefetch_factor if workers else None,
            persistent_workers=persistent_workers and workers > 0,
        )

    def manifest(self) -> dict[str, Any]:
        """JSON-able description for artifact manifests and task results."""
        return {
            "fingerprint": self.fingerprint,
            "info_path": str(self.info_path),
            "info_sha256": self.info_sha256,
            "data_root": str(self.data_root),
            "pipeline": self.pipeline,
            "sampling": self.sampling,
            "seed": self.seed,
            "num_samples": len(self.records),
            "scenes": len({r.scene for r in self.records}),
            "tokens": self.tokens,
            "data": self.settings.tensor_values(self.pipeline),
        }


def build_calibration_set(
    data_root: str | Path,
    info_path: str | Path | None,
    data_cfg: Any,
    num_samples: int,
    sampling: str = "spread",
    pipeline: str = "test",
    seed: int = 0,
    cap: bool = False,
) -> CalibrationSet:
    """Choose ``num_samples`` keyframes of a nuScenes tree and describe how to load them.

    ``info_path`` None means ``<data_root>/nuscenes_infos_train.pkl`` (the reference calibrates
    on the train split); a relative path that does not exist is also tried under ``data_root``.
    ``data_cfg`` is the config's ``data`` section (or the whole config). A tree with fewer
    keyframes than ``num_samples`` is an error, unless ``cap``: then every keyframe is taken
    and a warning names both numbers (a default size meeting a small tree).
    """
    settings = DataSettings.from_cfg(data_cfg)
    check_pipeline(pipeline)
    root = Path(data_root)
    if not root.is_dir():
        raise DatasetError(f"data root is not a directory: {root}")
    path = Path(info_path) if info_path is not None else root / DEFAULT_INFO_NAME
    if not path.is_absolute() and not path.exists() and (root / path).exists():
        path = root / path
    info = read_info_file(path)
    if num_samples < 1:
        raise DatasetError(f"{path}: asked for {num_samples} calibration samples; need at least 1")
    if num_samples > len(info) and cap:
        log.warning(
            "%s holds %d distinct keyframes, fewer than the default %d calibration batches: calibrating on all %d",
            path, len(info), num_samples, len(info),
        )
        num_samples = len(info)
    if num_samples > len(info):
        raise DatasetError(
            f"{path} has only {len(info)} samples, fewer than the {num_samples} calibration batches requested"
        )

    scenes = info.scenes()
    chosen = choose_samples(scenes, num_samples, sampling, seed)
    records = tuple(info.record(i, root, scenes[i]) for i in chosen)
    # test reads the newest sweeps_num sweeps; train-aug may draw any of them.
    sizes = _check_files(records, settings, path, settings.sweeps_num if pipeline == "test" else None)
    fingerprint = data_sha256(
        {
            "info_sha256": info.sha256,
            "tokens": [r.token for r in records],
            "pipeline": pipeline,
            "data": settings.tensor_values(pipeline),
            "seed": seed if pipeline == "train-aug" else None,
            "file_sizes": sizes,
        }
    )
    log.info(
        "calibration set: %d keyframes from %d scenes of %s (%s, %s), fingerprint %s",
        len(records),
        len({r.scene for r in records}),
        path,
        sampling,
        pipeline,
        fingerprint[:12],
    )
    return CalibrationSet(root, path, info.sha256, settings, pipeline, sampling, seed, records, fingerprint)


def _check_files(
    records: tuple[SampleRecord, ...], settings: DataSettings, info_path: Path, max_sweeps: int | None
) -> list[int]:
    """Every file the pipeline reads present, lidar files whole; returns their sizes in read order."""
    row_bytes = 4 * settings.load_dim
    sizes: list[int] = []
    for record in records:
        for field_name, file_path in record.files(max_sweeps):
            try:
                size = os.path.getsize(file_path)
            except OSError:
                raise DatasetError(
                    f"{info_path}: sample {record.token}: file of field '{field_name}' not found: {file_path}"
                ) from None
            if file_path.name.endswith(".bin") and size % row_bytes:
                raise DatasetError(
                    f"{info_path}: sample {record.token}: lidar file of field '{field_name}' is truncated: "
                    f"{file_path} has {size} bytes, not a multiple of {row_bytes} ({settings.load_dim} float32 a point)"
                )
            sizes.append(size)
    return sizes


class _OwnErrorsLoader(DataLoader):
    """A DataLoader whose workers' input errors reach the caller as the worker raised them.

    torch re-raises an error of a worker process as the same type with a new message:
    "Caught DatasetError in DataLoader worker process 0", then the worker's whole traceback,
    and only at the end our message that names the sample and file. The user gets our
    message alone; the worker traceback goes to the debug log (``-v``).
    """

    def __iter__(self) -> Iterator[Any]:
        return _own_errors(super().__iter__())


def _own_errors(batches: Iterator[Any]) -> Iterator[Any]:
    try:
        yield from batches
    except PTQError as exc:
        original = worker_error_message(exc)
        if original is None:
            raise
        log.debug("data-loader worker failed:\n%s", exc)
        raise type(exc)(original) from None


def worker_error_message(exc: BaseException) -> str | None:
    """The message a data-loader worker raised, from torch's re-raised copy; None if not one."""
    text = str(exc)
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return None
    marker = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    at = text.rfind(marker)
    return text[at + len(marker):].strip() if at >= 0 else None

