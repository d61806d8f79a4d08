"""Train ``bevfusion-tiny`` on a generated nuScenes-layout tree (tool code, not the library).

The objective is TransFusion's (see :mod:`tools.tiny_objective` for which box convention each
head channel learns); the data is the library's ``train-aug`` pipeline; the result is a
checkpoint in the reference layout (an mmcv dict ``{"state_dict", "meta"}``, sparse weights
in the spconv 1.x layout, floating tensors stored as fp16) that
``bevfusion_ptq.model.load_model`` loads strictly (restoring fp32).

Schedule: AdamW, linear warm-up over the first ``--warmup-steps``, then the peak rate until
the end of epoch 1, then cosine decay to zero at the end of the last epoch. With
``--epochs auto`` the epoch count is fixed after epoch 1 from its wall time so that training
fits ``--train-minutes``; the report records the count, and ``--epochs N`` with that count
repeats the run. ``--max-minutes`` is a hard stop at a step boundary (the report says so).

Determinism: the initial weights, the shuffling (per epoch) and every augmentation draw
(per sample and epoch, independent of the worker that loads it) derive from ``--seed``, so
two runs see the same batches in the same order from the same start (the first loss repeats
exactly). Scatter-adds in the backward pass (BEV pooling, sparse convs; CUDA atomics, CPU
threads) sum in varying order, so gradients and later steps agree only to rounding.

After training, the model is measured on the val infos (the ``test`` pipeline): the three
losses, and per-class precision/recall at 2 m (:mod:`tools.tiny_measure`).

Outputs in ``--out`` (rewritten after every epoch, so a failure keeps the last finished one):
``bevfusion-tiny.pth``, ``train_report.json``, ``train.log``.

    python tools/train_tiny.py --data-root /data/tree --out out --epochs auto --train-minutes 6
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import signal
import sys
import time
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset, Sampler  # noqa: E402

from bevfusion_ptq.data import collate, move_batch, read_info_file  # noqa: E402
from bevfusion_ptq.data.infos import SampleRecord  # noqa: E402
from bevfusion_ptq.data.pipeline import SamplePipeline  # noqa: E402
from bevfusion_ptq.data.settings import DataSettings  # noqa: E402
from bevfusion_ptq.hashing import file_sha256  # noqa: E402
from bevfusion_ptq.model.builder import build_model  # noqa: E402
from bevfusion_ptq.model.checkpoint import SPCONV1, to_reference_layout  # noqa: E402
from bevfusion_ptq.model.config import load_config  # noqa: E402
from tools.tiny_measure import DetectionMeasure, format_summary  # noqa: E402
from tools.tiny_objective import BevGrid, GroundTruth, TransFusionObjective  # noqa: E402

log = logging.getLogger("train_tiny")

CHECKPOINT_NAME = "bevfusion-tiny.pth"
REPORT_NAME = "train_report.json"
LOG_NAME = "train.log"
#: tensors kept in fp32 in the saved file: geometry the view transform indexes with (pixel
#: coordinates up to 352 and depths lose sub-pixel precision in fp16) and BN statistics.
FP32_KEEP = ("vtransform.frustum", "vtransform.dx", "vtransform.bx", "running_mean", "running_var")


def allow_cpu_sparse_backward() -> None:
    """Let spconv's sparse-conv backward run with a CPU-only torch (CPU toy runs, tests).

    spconv 2.3.8's ``indice_conv_backward`` asks torch for the current CUDA stream before it
    looks at the device, which raises on a torch built without CUDA, although its CPU branch
    never uses the stream. Without CUDA we hand it stream 0; with CUDA nothing changes.
    """
    if torch.cuda.is_available():
        return
    from spconv.pytorch import ops

    ops.get_current_stream = lambda: 0


# --------------------------------------------------------------------------- data
class KeyframeDataset(Dataset):
    """Item ``k`` is keyframe ``k % N`` at position ``k`` of the pipeline's random stream, so
    epoch ``e`` (indices ``e * N ...``) draws new augmentations, the same in every run."""

    def __init__(self, records: list[SampleRecord], pipeline: SamplePipeline) -> None:
        self.records = records
        self.pipeline = pipeline

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.pipeline(self.records[index % len(self.records)], index)


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, offset by ``epoch * N`` (see :class:`KeyframeDataset`)."""

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        else:
            order = torch.arange(self.size)
        offset = self.epoch * self.size
        return iter((order + offset).tolist())


def read_records(data_root: Path, info_name: str, limit: int | None = None) -> list[SampleRecord]:
    info = read_info_file(data_root / info_name)
    scenes = info.scenes()
    count = len(info) if limit is None else min(limit, len(info))
    return [info.record(i, data_root, scenes[i]) for i in range(count)]


def make_loader(
    records: list[SampleRecord], settings: DataSettings, pipeline: str, seed: int, batch_size: int, workers: int,
    shuffle: bool, drop_last: bool,
) -> tuple[DataLoader, EpochSampler]:
    sampler = EpochSampler(len(records), seed, shuffle)
    loader = DataLoader(
        KeyframeDataset(records, SamplePipeline(settings, pipeline, seed)),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
    )
    return loader, sampler


# --------------------------------------------------------------------------- schedule
class Schedule:
    """Warm-up, peak until the end of epoch 1, cosine to zero at ``total_steps``."""

    def __init__(self, peak: float, warmup_steps: int, epoch_steps: int) -> None:
        self.peak, self.warmup, self.epoch_steps = peak, warmup_steps, epoch_steps
        self.total_steps: int | None = None

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        if self.total_steps is None or step < self.epoch_steps:
            return self.peak
        span = max(1, self.total_steps - self.epoch_steps)
        return 0.5 * self.peak * (1 + math.cos(math.pi * min(1.0, (step - self.epoch_steps) / span)))


# --------------------------------------------------------------------------- checkpoint
def save_checkpoint(model: torch.nn.Module, path: Path, meta: dict[str, Any]) -> str:
    """Reference layout (spconv 1.x sparse weights), fp16 floats except :data:`FP32_KEEP`;
    written atomically. Returns its sha256."""
    state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in to_reference_layout(state, expected).items():
        if value.is_floating_point() and not any(k in key for k in FP32_KEEP):
            value = value.half()
        out[key] = value.cpu()
    meta = dict(meta, sparse_layout=SPCONV1, storage="float16 (fp32: " + ", ".join(FP32_KEEP) + ")")
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"state_dict": out, "meta": meta}, tmp)
    os.replace(tmp, path)
    return file_sha256(path)


# --------------------------------------------------------------------------- steps
def ground_truth(batch: dict[str, Any], class_names: list[str], grid: BevGrid) -> list[GroundTruth]:
    """Per-sample gt on the CPU, where the objective builds its targets."""
    return [GroundTruth.from_meta(m, class_names, grid) for m in batch["metas"]]


def grid_of(model: torch.nn.Module, cfg: Any) -> BevGrid:
    """The head's BEV grid for the config's point-cloud range."""
    head = model.heads["object"]
    pcr = cfg.data.point_cloud_range
    f = head.out_size_factor
    nx = round((pcr[3] - pcr[0]) / (head.voxel_size[0] * f))
    ny = round((pcr[4] - pcr[1]) / (head.voxel_size[1] * f))
    return BevGrid.of_head(head, nx, ny)


def head_predictions(model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The head's raw predictions (the forward without decoding)."""
    return model.heads["object"](model.extract_features(batch)["decoder_out"])


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, objective: TransFusionObjective, loader: DataLoader, class_names: list[str],
    grid: BevGrid, device: torch.device, score_threshold: float,
) -> dict[str, Any]:
    """Mean losses and the 2 m precision/recall over ``loader`` (model in eval mode)."""
    model.eval()
    measure = DetectionMeasure(class_names, score_threshold=score_threshold)
    sums: dict[str, float] = {}
    batches = samples = 0
    for batch in loader:
        batch = move_batch(batch, device)
        gts = ground_truth(batch, class_names, grid)
        preds = head_predictions(model, batch)
        for name, value in objective(preds, gts).items():
            if name.startswith("loss"):
                sums[name] = sums.get(name, 0.0) + float(value)
        for boxes, gt in zip(model.heads["object"].decode(preds), gts):
            measure.add(boxes, gt.boxes[:, :3], gt.labels)
        batches += 1
        samples += len(gts)
    return {
        "samples": samples,
        "losses": {k: round(v / max(batches, 1), 5) for k, v in sums.items()},
        "detection": measure.summary(),
    }


def _monotonic_at(unix_time: float | None) -> float:
    """A wall-clock (Unix) time as a ``perf_counter`` reading; inf for None."""
    if unix_time is None:
        return math.inf
    return time.perf_counter() + (unix_time - time.time())


class Report:
    """``train_report.json``, rewritten atomically whenever something is added."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path, self.data = path, data
        self.write()

    def write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)


def train(ns: argparse.Namespace) -> int:
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.manual_seed(ns.seed)
    device = torch.device("cuda" if ns.device == "auto" and torch.cuda.is_available() else ns.device.replace("auto", "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True

    allow_cpu_sparse_backward()
    cfg = load_config("bevfusion-tiny")
    settings = DataSettings.from_cfg(cfg)
    class_names = list(cfg.data.class_names)
    root = Path(ns.data_root)
    train_records = read_records(root, ns.train_info, ns.limit)
    val_records = read_records(root, ns.val_info, ns.val_limit) if not ns.no_val else []
    tree = json.loads((root / "tree.json").read_text()) if (root / "tree.json").is_file() else None

    model = build_model(cfg).to(device)
    if ns.init_checkpoint:
        from bevfusion_ptq.model.checkpoint import load_checkpoint

        load_checkpoint(model, ns.init_checkpoint)
    grid = grid_of(model, cfg)
    objective = TransFusionObjective(len(class_names), grid, min_radius=ns.min_radius).to(device)
    train_loader, train_sampler = make_loader(
        train_records, settings, ns.pipeline, ns.seed, ns.batch_size, ns.workers, shuffle=True, drop_last=True
    )
    val_loader = (
        make_loader(val_records, settings, "test", ns.seed, ns.batch_size, ns.workers, shuffle=False, drop_last=False)[0]
        if val_records
        else None
    )
    epoch_steps = len(train_loader)
    if epoch_steps == 0:
        raise SystemExit(f"{len(train_records)} training keyframes give no batch of {ns.batch_size}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=ns.lr, weight_decay=ns.weight_decay)
    schedule = Schedule(ns.lr, min(ns.warmup_steps, epoch_steps), epoch_steps)
    planned_epochs = None if ns.epochs == "auto" else int(ns.epochs)
    if planned_epochs is not None:
        schedule.total_steps = planned_epochs * epoch_steps

    report = Report(
        out / REPORT_NAME,
        {
            "command": shlex.join([sys.executable, *sys.argv]),
            "args": vars(ns),
            "host": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                "cpus": os.cpu_count(),
            },
            "tree": tree,
            "train_keyframes": len(train_records),
            "val_keyframes": len(val_records),
            "steps_per_epoch": epoch_steps,
            "epochs_planned": planned_epochs,
            "epochs": [],
            "status": "running",
        },
    )
    log.info(
        "training on %s: %d train keyframes (%d steps of %d per epoch), %d val keyframes, %d workers",
        device, len(train_records), epoch_steps, ns.batch_size, len(val_records), ns.workers,
    )

    step = 0
    stop_reason = "epochs done"
    # Wall-clock limits: relative to this process's start, or absolute (a driver's budget
    # that includes what ran before this process).
    deadline = min(started + ns.max_minutes * 60 if ns.max_minutes else math.inf, _monotonic_at(ns.stop_at))
    plan_until = min(started + ns.train_minutes * 60 if ns.train_minutes else math.inf, _monotonic_at(ns.plan_until))
    if planned_epochs is None and plan_until == math.inf:
        raise SystemExit("--epochs auto needs --train-minutes or --plan-until")
    epoch = 0
    quarter = max(1, epoch_steps // 4)  # epoch 1's rate is measured after its first quarter (warm-up)
    quarter_time = 0.0
    try:
        while planned_epochs is None or epoch < planned_epochs:
            model.train()
            train_sampler.set_epoch(epoch)
            epoch_start = time.perf_counter()
            sums: dict[str, float] = {}
            done = 0
            wait = 0.0
            tick = time.perf_counter()
            for batch in train_loader:
                wait += time.perf_counter() - tick
                if time.perf_counter() > deadline:
                    stop_reason = f"wall-clock limit reached (--max-minutes {ns.max_minutes}, --stop-at {ns.stop_at})"
                    break
                for group in optimizer.param_groups:
                    group["lr"] = schedule.lr(step)
                batch = move_batch(batch, device)
                preds = head_predictions(model, batch)
                if step == 0 and tuple(preds["dense_heatmap"].shape[-2:]) != (grid.nx, grid.ny):
                    raise RuntimeError(f"heatmap {tuple(preds['dense_heatmap'].shape)} is not the grid {grid}")
                losses = objective(preds, ground_truth(batch, class_names, grid))
                optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), ns.grad_clip)
                optimizer.step()
                step += 1
                done += 1
                if done == quarter:
                    quarter_time = time.perf_counter()
                values = {name: float(value.detach()) for name, value in losses.items()}
                for name, value in values.items():
                    sums[name] = sums.get(name, 0.0) + value
                if step % ns.log_every == 0 or step == 1:
                    log.info(
                        "epoch %d step %d/%d (total %d) loss %.4f (heatmap %.4f cls %.4f bbox %.4f) matched %.1f "
                        "grad %.2f lr %.2e | %.1f samples/s, data wait %.0f%%",
                        epoch + 1, done, epoch_steps, step, values["loss"], values["loss_heatmap"],
                        values["loss_cls"], values["loss_bbox"], values["matched"] / ns.batch_size,
                        float(grad_norm), schedule.lr(step - 1), done * ns.batch_size / (time.perf_counter() - epoch_start),
                        100 * wait / (time.perf_counter() - epoch_start),
                    )
                tick = time.perf_counter()
            seconds = time.perf_counter() - epoch_start
            means = {k: round(v / max(done, 1), 5) for k, v in sums.items()}
            finished = done == epoch_steps
            record = {
                "epoch": epoch + 1, "steps": done, "complete": finished, "total_steps": step,
                "seconds": round(seconds, 1), "samples_per_s": round(done * ns.batch_size / seconds, 1),
                "data_wait_fraction": round(wait / seconds, 3), "mean_losses": means,
                "lr_end": schedule.lr(step - 1),
            }
            epoch += 1
            if planned_epochs is None:
                budget = plan_until - time.perf_counter()
                steady = seconds
                if done > quarter:  # steady-state epoch time, without start-up and warm-up
                    steady = (time.perf_counter() - quarter_time) / (done - quarter) * epoch_steps
                planned_epochs = max(epoch, epoch + int(budget // steady))
                schedule.total_steps = planned_epochs * epoch_steps
                report.data["epochs_planned"] = planned_epochs
                log.info("epoch 1 took %.1f s (steady state %.1f s an epoch): planning %d epochs (%d steps) "
                         "in the %.0f s left", seconds, steady, planned_epochs, schedule.total_steps, budget)
            meta = {
                "config": "bevfusion-tiny", "trained_by": "tools/train_tiny.py", "seed": ns.seed,
                "epochs_done": epoch if finished else epoch - 1 + done / epoch_steps,
                "steps": step, "train_keyframes": len(train_records),
            }
            sha = save_checkpoint(model, out / CHECKPOINT_NAME, meta)
            record["checkpoint_sha256"] = sha
            report.data["epochs"].append(record)
            report.data["steps"] = step
            report.data["train_seconds"] = round(time.perf_counter() - started, 1)
            report.write()
            log.info("epoch %d: %s in %.1f s (%.1f samples/s, data wait %.0f%%); checkpoint %s",
                     epoch, means, seconds, record["samples_per_s"], 100 * record["data_wait_fraction"], sha[:12])
            if not finished:
                break
    except BaseException as exc:
        report.data["status"] = "failed"
        report.data["error"] = "".join(traceback.format_exception(exc))
        report.write()
        log.exception("training failed at step %d; the checkpoint of the last finished epoch stays in %s", step, out)
        raise
    report.data["stop_reason"] = stop_reason
    report.data["final_losses"] = report.data["epochs"][-1]["mean_losses"] if report.data["epochs"] else None
    report.data["checkpoint"] = {
        "file": CHECKPOINT_NAME,
        "sha256": file_sha256(out / CHECKPOINT_NAME),
        "bytes": (out / CHECKPOINT_NAME).stat().st_size,
    }
    report.data["status"] = "trained"
    report.write()
    if val_loader is not None:
        val_start = time.perf_counter()
        result = evaluate(model, objective, val_loader, class_names, grid, device, ns.score_threshold)
        result["seconds"] = round(time.perf_counter() - val_start, 1)
        report.data["val"] = result
        log.info("val (%d keyframes): losses %s\n%s", result["samples"], result["losses"],
                 format_summary(result["detection"]))
    report.data["status"] = "done"
    report.data["total_seconds"] = round(time.perf_counter() - started, 1)
    report.write()
    return 0


def evaluate_checkpoint(ns: argparse.Namespace) -> int:
    """Measure a saved checkpoint on the val infos, loading it as a PTQ run does (strictly,
    fp16 restored to fp32); the result joins ``train_report.json`` when there is one."""
    from bevfusion_ptq.model.checkpoint import load_model

    started = time.perf_counter()
    device = torch.device("cuda" if ns.device == "auto" and torch.cuda.is_available() else ns.device.replace("auto", "cpu"))
    cfg = load_config("bevfusion-tiny")
    model = load_model(cfg, ns.evaluate).to(device)
    class_names = list(cfg.data.class_names)
    grid = grid_of(model, cfg)
    objective = TransFusionObjective(len(class_names), grid, min_radius=ns.min_radius).to(device)
    records = read_records(Path(ns.data_root), ns.val_info, ns.val_limit)
    loader = make_loader(
        records, DataSettings.from_cfg(cfg), "test", ns.seed, ns.batch_size, ns.workers, shuffle=False, drop_last=False
    )[0]
    result = evaluate(model, objective, loader, class_names, grid, device, ns.score_threshold)
    result["checkpoint_sha256"] = file_sha256(ns.evaluate)
    result["info"] = ns.val_info
    result["seconds"] = round(time.perf_counter() - started, 1)
    log.info("val (%d keyframes): losses %s\n%s", result["samples"], result["losses"], format_summary(result["detection"]))
    path = Path(ns.out) / REPORT_NAME
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["val"] = result
    Report(path, data)
    if Path(ns.evaluate).resolve() == (Path(ns.out) / CHECKPOINT_NAME).resolve():
        write_record(Path(ns.out), data)
    return 0


def write_record(out: Path, report: dict[str, Any]) -> Path:
    """``bevfusion-tiny.json``: what ships beside the checkpoint in ``bevfusion_ptq/checkpoints``."""
    ckpt = out / CHECKPOINT_NAME
    epochs = report.get("epochs", [])
    record = {
        "file": CHECKPOINT_NAME,
        "sha256": file_sha256(ckpt),
        "bytes": ckpt.stat().st_size,
        "config": "bevfusion-tiny",
        "layout": "mmcv dict {state_dict, meta}; sparse weights spconv 1.x; fp16 except " + ", ".join(FP32_KEEP),
        "training_command": os.environ.get("TRAIN_DRIVER_COMMAND") or report.get("command"),
        "train_tiny_command": report.get("command"),
        "generator": report.get("tree"),
        "host": report.get("host"),
        "training": {
            "train_keyframes": report.get("train_keyframes"),
            "batch_size": report.get("args", {}).get("batch_size"),
            "epochs_planned": report.get("epochs_planned"),
            "epochs_done": len([e for e in epochs if e.get("complete")]),
            "steps": report.get("steps"),
            "seconds": report.get("train_seconds"),
            "stop_reason": report.get("stop_reason"),
            "final_losses": report.get("final_losses"),
            "first_epoch_losses": epochs[0]["mean_losses"] if epochs else None,
        },
        "val": report.get("val"),
    }
    path = out / "bevfusion-tiny.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", required=True, help="generated tree (tools/make_training_tree.py)")
    ap.add_argument("--train-info", default="nuscenes_infos_train.pkl")
    ap.add_argument("--val-info", default="nuscenes_infos_val.pkl")
    ap.add_argument("--out", required=True, help="folder for the checkpoint, report and log")
    ap.add_argument("--evaluate", default=None, metavar="CHECKPOINT",
                    help="only measure this checkpoint on the val infos (no training)")
    ap.add_argument("--epochs", default="auto", help="epoch count, or 'auto' (fit --train-minutes)")
    ap.add_argument("--train-minutes", type=float, default=None, help="budget that --epochs auto plans for")
    ap.add_argument("--max-minutes", type=float, default=0.0, help="hard stop at a step boundary (0: none)")
    ap.add_argument("--plan-until", type=float, default=None, metavar="UNIX_TIME",
                    help="--epochs auto plans to end by this wall-clock time (and within --train-minutes)")
    ap.add_argument("--stop-at", type=float, default=None, metavar="UNIX_TIME",
                    help="hard stop at a step boundary at this wall-clock time (and within --max-minutes)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup-steps", type=int, default=200)
    ap.add_argument("--grad-clip", type=float, default=35.0)
    ap.add_argument("--min-radius", type=int, default=1, help="smallest heatmap Gaussian radius, in BEV cells")
    ap.add_argument("--pipeline", default="train-aug", choices=["train-aug", "test"])
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--limit", type=int, default=None, help="use only the first N train keyframes")
    ap.add_argument("--val-limit", type=int, default=None, help="use only the first N val keyframes")
    ap.add_argument("--no-val", action="store_true", help="skip the val measurement")
    ap.add_argument("--score-threshold", type=float, default=0.3, help="a priori score threshold of the val measure")
    ap.add_argument("--init-checkpoint", default=None, help="start from these weights instead of a fresh init")
    ap.add_argument("--log-every", type=int, default=50)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    Path(ns.out).mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(message)s",
        handlers=[logging.StreamHandler(), logging.FileHandler(Path(ns.out) / LOG_NAME)],
    )
    # A timeout's SIGTERM becomes SystemExit, so the report records where training stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return evaluate_checkpoint(ns) if ns.evaluate else train(ns)


if __name__ == "__main__":
    raise SystemExit(main())
