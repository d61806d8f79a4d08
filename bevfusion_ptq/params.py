"""The PTQ job's parameters: one typed model for the CLI, the Prefect UI form and deployments."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bevfusion_ptq.quant.rules import DEFAULT_EXCLUDE


class PTQParams(BaseModel):
    """Everything that decides what a PTQ run produces (plus where it goes).

    Field names are the CLI options with ``_`` for ``-`` (``calib_batches`` is
    ``--calib-batches``); descriptions are the help texts and the UI form's labels.
    """

    model_config = ConfigDict(extra="forbid")

    config: str = Field(
        "bevfusion-tiny",
        description="model config: a shipped name (bevfusion-r50, bevfusion-tiny) or a path to an OpenMMLab .py config",
    )
    checkpoint: str | None = Field(
        None,
        description="checkpoint file (mmcv dict or bare state dict); default: a random-weight "
        "checkpoint in the reference layout, written once under the state directory",
    )
    data_root: str | None = Field(
        None,
        description="nuScenes root holding samples/, sweeps/ and the info .pkl; default: a generated nuScenes-format tree",
    )
    calib_batches: int = Field(8, ge=1, le=100_000, description="number of calibration batches (batch size 1)")
    calib_sampling: Literal["spread", "shuffle"] = Field(
        "spread", description="spread: keyframes evenly across scenes; shuffle: the reference's shuffled order"
    )
    calib_pipeline: Literal["test", "train-aug"] = Field(
        "test", description="test: deterministic test-time transform; train-aug: the reference's seeded augmentations"
    )
    calib_method: Literal["mse", "percentile", "entropy", "max"] = Field(
        "mse", description="how activation amax is chosen from the histograms"
    )
    percentile: float = Field(99.99, gt=0, le=100, description="percentile for --calib-method percentile")
    exclude: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXCLUDE),
        description="module path patterns whose quantizers are disabled after calibration (repeatable)",
    )
    fidelity_batches: int = Field(
        2, ge=0, le=10_000,
        description="batches of the calibration set on which INT8 is compared with FP32 (0: no fidelity report)",
    )
    calib_checkpoint_every: int = Field(
        0, ge=0,
        description="save the calibration state every N batches so a retry resumes there (0: about every 2 minutes)",
    )
    output: str = Field(
        "./artifacts", description="where versions are published: a local directory or s3://bucket/prefix"
    )
    sse: Literal["AES256", "aws:kms"] | None = Field(
        None, description="S3 server-side encryption for published objects (s3:// outputs only)"
    )
    sse_kms_key_id: str | None = Field(None, description="KMS key id for --sse aws:kms (default: the bucket's key)")
    eval_samples: int | None = Field(
        None, ge=0,
        description="keyframes of the validation split on which FP32 and INT8 nuScenes mAP/NDS are measured; "
        "default: the whole split of a generated tree, 500 spread over the scenes of --data-root; 0: no evaluation",
    )
    eval_version: str | None = Field(
        None, description="nuScenes table version under the data root (v1.0-trainval, v1.0-mini); default: the one found there"
    )
    eval_split: Literal["val", "mini_val"] | None = Field(
        None, description="devkit split to evaluate on; default: val for *trainval, mini_val for *mini"
    )
    max_map_drop: float | None = Field(
        0.5, ge=0, description="gate: largest INT8 mAP drop against FP32 allowed, in points; none: no mAP check"
    )
    max_nds_drop: float | None = Field(
        0.5, ge=0, description="gate: largest INT8 NDS drop against FP32 allowed, in points; none: no NDS check"
    )
    min_fidelity_cosine: float | None = Field(
        None, ge=-1, le=1,
        description="gate: lowest INT8-vs-FP32 cosine allowed at any stage boundary of the fidelity report; none: no check",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="calibration device; auto picks cuda when available")
    seed: int = Field(0, ge=0, description="seed for generated data, random checkpoints and sampling")

    @field_validator("eval_samples", "max_map_drop", "max_nds_drop", "min_fidelity_cosine", mode="before")
    @classmethod
    def _none_word(cls, value: object) -> object:
        """``none`` (as typed on the command line) means no value: default or check off."""
        return None if isinstance(value, str) and value.strip().lower() in ("none", "null") else value

    @property
    def model_name(self) -> str:
        """The name versions are published under (``bevfusion_r50.py`` -> ``bevfusion-r50``)."""
        return Path(self.config).stem.replace("_", "-")

    @property
    def publishes_to_s3(self) -> bool:
        return self.output.startswith("s3://")
