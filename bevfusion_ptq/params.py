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
    calib_method: Literal["mse", "percentile", "entropy", "max", "auto"] = Field(
        "mse", description="how activation amax is chosen from the histograms; auto: per quantizer, the candidate "
        "(mse, entropy, percentile 99.9/99.99/99.999, max) with the least error at its consumer on held-out batches"
    )
    percentile: float = Field(99.99, gt=0, le=100, description="percentile for --calib-method percentile")
    exclude: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXCLUDE),
        description="module path patterns whose quantizers are disabled after calibration (repeatable); "
        "auto:<target> adds the smallest list the sensitivity analysis finds for a metric drop <= target",
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
    heldout_batches: int = Field(
        2, ge=1, le=10_000,
        description="held-out batches (the data's val split) on which --calib-method auto and the sensitivity "
        "analysis measure",
    )
    sensitivity_target: float | None = Field(
        None, gt=0,
        description="run the per-group sensitivity analysis in the flow and propose exclusions for a metric drop "
        "<= this target (implied by --exclude auto:<target>)",
    )
    sensitivity_metric: Literal["decoder_out", "heatmap"] = Field(
        "decoder_out", description="the sensitivity analysis' metric: relative L2 error of this output against FP32"
    )
    sensitivity_groups: list[str] = Field(
        default_factory=list,
        description="analyse only quantizer groups whose name or a layer matches these patterns (repeatable; the "
        "others stay INT8 in every measurement; default: all groups)",
    )

    @field_validator("exclude")
    @classmethod
    def _one_valid_auto_target(cls, value: list[str]) -> list[str]:
        autos = [v for v in value if v.startswith("auto:")]
        if len(autos) > 1:
            raise ValueError(f"at most one auto:<target> exclusion, got {', '.join(autos)}")
        for v in autos:
            try:
                target = float(v.removeprefix("auto:"))
            except ValueError:
                raise ValueError(f"{v!r}: the target after auto: must be a number, e.g. auto:0.05") from None
            if not target > 0:
                raise ValueError(f"{v!r}: the target must be > 0")
        return value

    @property
    def auto_exclude_target(self) -> float | None:
        """The target of an ``auto:<target>`` exclusion, None without one."""
        for v in self.exclude:
            if v.startswith("auto:"):
                return float(v.removeprefix("auto:"))
        return None

    @property
    def exclude_patterns(self) -> list[str]:
        """The user's exclusion patterns, without an ``auto:<target>`` entry."""
        return [v for v in self.exclude if not v.startswith("auto:")]

    @property
    def runs_sensitivity(self) -> bool:
        return self.sensitivity_target is not None or self.auto_exclude_target is not None

    @property
    def model_name(self) -> str:
        """The name versions are published under (``bevfusion_r50.py`` -> ``bevfusion-r50``)."""
        return Path(self.config).stem.replace("_", "-")

    @property
    def publishes_to_s3(self) -> bool:
        return self.output.startswith("s3://")
