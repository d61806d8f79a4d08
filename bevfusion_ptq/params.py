"""The PTQ job's parameters: one typed model for the CLI, the Prefect UI form and deployments."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bevfusion_ptq.quant.rules import DEFAULT_EXCLUDE


#: Default calibration size on the generated demo tree: enough to exercise every stage quickly.
DEMO_CALIB_BATCHES = 8
#: Default on a user's tree: the reference calibrates on 300 batches (its maintainers advise
#: about 400 distinct keyframes rather than consecutive frames).
REAL_CALIB_BATCHES = 300
#: Below this many keyframes of a real tree, a run warns that the statistics are thin.
MIN_REAL_CALIB_BATCHES = 100


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
        description="checkpoint file (mmcv dict or bare state dict), s3:// URL, or 'random'; default: for "
        "bevfusion-tiny the trained checkpoint shipped in the package (bevfusion_ptq/checkpoints, trained on "
        "generated data by tools/train_tiny.py), for other configs random weights; 'random': a random-weight "
        "checkpoint in the reference layout, written once under the state directory",
    )
    data_root: str | None = Field(
        None,
        description="nuScenes root holding samples/, sweeps/ and the info .pkl; default: a generated nuScenes-format tree",
    )
    calib_batches: int | None = Field(
        None, ge=1, le=100_000,
        description="calibration batches, one distinct keyframe each (batch size 1). Default: 300 with "
        "--data-root, as the reference calibrates (capped, with a warning, at the keyframes the info file "
        "holds), and 8 on the generated demo tree. Fewer than 100 on a real tree is warned about: so few "
        "keyframes rarely represent the data",
    )
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
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="calibration device; auto picks cuda when available")
    seed: int = Field(0, ge=0, description="seed for generated data, random checkpoints and sampling")
    export: list[Literal["int8", "fp16"]] = Field(
        default_factory=lambda: ["int8"],
        description="deployment ONNX sets to write into the version: int8 (default), fp16 (every quantizer off), "
        "comma-separated or repeated (--export int8,fp16); none: no export",
    )

    @field_validator("export", mode="before")
    @classmethod
    def _split_export(cls, value: object) -> object:
        """``int8,fp16`` and repeated options both give a list; ``none`` gives no export."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            items = [p.strip() for v in value for p in str(v).split(",") if p.strip()]
            items = [p for p in items if p != "none"]
            return list(dict.fromkeys(items))
        return value

    @property
    def requested_calib_batches(self) -> int:
        """``calib_batches``, or the default for the data: a real tree gets the reference's 300."""
        if self.calib_batches is not None:
            return self.calib_batches
        return DEMO_CALIB_BATCHES if self.data_root is None else REAL_CALIB_BATCHES

    @property
    def model_name(self) -> str:
        """The name versions are published under (``bevfusion_r50.py`` -> ``bevfusion-r50``)."""
        return Path(self.config).stem.replace("_", "-")

    @property
    def publishes_to_s3(self) -> bool:
        return self.output.startswith("s3://")
