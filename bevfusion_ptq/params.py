"""The PTQ job's parameters: one typed model for the CLI, the Prefect UI form and deployments."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from bevfusion_ptq.quant.defaults import DEFAULT_EXCLUDE

# The UI form's field titles (pydantic's own would read "Sse Kms Key Id").
_TITLES = {
    "config": "Model config",
    "checkpoint": "Checkpoint",
    "data_root": "nuScenes data root",
    "calib_batches": "Calibration batches",
    "calib_sampling": "Calibration sampling",
    "calib_pipeline": "Calibration pipeline",
    "calib_method": "Calibration method",
    "percentile": "Percentile",
    "exclude": "Excluded modules",
    "fidelity_batches": "Fidelity batches",
    "calib_checkpoint_every": "Save calibration state every N batches",
    "output": "Output (directory or s3:// URL)",
    "sse": "S3 server-side encryption",
    "sse_kms_key_id": "SSE KMS key id",
    "device": "Device",
    "seed": "Seed",
    "export": "Deployment ONNX sets",
    "eval_samples": "Evaluation keyframes",
    "eval_version": "nuScenes table version",
    "eval_split": "Evaluation split",
    "max_map_drop": "Gate: largest mAP drop (points)",
    "max_nds_drop": "Gate: largest NDS drop (points)",
    "min_fidelity_cosine": "Gate: lowest fidelity cosine",
    "heldout_batches": "Held-out batches (auto method, sensitivity)",
    "sensitivity_target": "Sensitivity analysis: target drop",
    "sensitivity_metric": "Sensitivity analysis: metric",
    "sensitivity_groups": "Sensitivity analysis: groups",
}


def _form_schema(schema: dict[str, Any]) -> None:
    """Optional fields as their plain type in the JSON schema (as pydantic 1 wrote them).

    Pydantic 2 writes ``str | None`` as ``anyOf [string, null]``, which Prefect's run form
    shows as a "str / None" switch with a "Property is type None" input. Here an optional
    field is its plain type, and unset means absent: the form leaves an empty field out, and
    :meth:`PTQParams._omit_unset_optionals` leaves None out of every dump (the flow's default
    in the form included), so the model's default (None) applies when it is read back.
    """
    for prop in schema.get("properties", {}).values():
        variants = prop.get("anyOf", [])
        kept = [v for v in variants if v.get("type") != "null"]
        # A field whose default is a value (a gate threshold) keeps its null: there "none"
        # is a choice (the check off), not "unset".
        if len(variants) == 2 and len(kept) == 1 and prop.get("default") is None:
            del prop["anyOf"]
            prop.update(kept[0])
            if prop.get("default", "") is None:
                del prop["default"]


#: Default calibration size on the generated demo tree: enough to exercise every stage quickly.
DEMO_CALIB_BATCHES = 8
#: Default on a user's tree: the reference calibrates on 300 batches (its maintainers advise
#: about 400 distinct keyframes rather than consecutive frames).
REAL_CALIB_BATCHES = 300
#: Below this many keyframes of a real tree, a run warns that the statistics are thin.
MIN_REAL_CALIB_BATCHES = 100


class PTQParams(BaseModel):
    """What a PTQ run quantizes, how it calibrates, and where the version is published."""

    # Field names are the CLI options with ``_`` for ``-`` (``calib_batches`` is
    # ``--calib-batches``); titles and descriptions are the UI form's labels and the help
    # texts. (A comment, not the docstring: the docstring is shown in the UI form.)
    model_config = ConfigDict(
        extra="forbid", title="PTQ parameters", json_schema_extra=_form_schema,
        field_title_generator=lambda name, _info: _TITLES.get(name, name.replace("_", " ").capitalize()),
    )

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
    calib_method: Literal["mse", "percentile", "entropy", "max", "auto"] = Field(
        "mse", description="how activation amax is chosen from the histograms; auto: per quantizer, the candidate "
        "(mse, entropy, percentile 99.9/99.99/99.999, max) with the least error at its consumer on held-out batches"
    )
    percentile: float = Field(99.99, gt=0, le=100, description="percentile for --calib-method percentile")
    exclude: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXCLUDE),
        description="module path patterns whose quantizers are disabled after calibration (repeatable); "
        "auto:TARGET adds the smallest list the sensitivity analysis finds for a metric drop <= TARGET",
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
    heldout_batches: int = Field(
        2, ge=1, le=10_000,
        description="held-out batches (the data's val split) on which --calib-method auto and the sensitivity "
        "analysis measure",
    )
    sensitivity_target: float | None = Field(
        None, gt=0,
        description="run the per-group sensitivity analysis in the flow and propose exclusions for a metric drop "
        "<= this target (implied by --exclude auto:TARGET)",
    )
    sensitivity_metric: Literal["decoder_out", "heatmap", "nds", "map"] = Field(
        "decoder_out",
        description="the sensitivity analysis' metric: relative L2 error of decoder_out or heatmap against FP32, "
        "or the drop of nuScenes nds or map in points (the val split's tables needed; noisy on few batches)",
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

    @field_validator("output")
    @classmethod
    def _known_output(cls, value: str) -> str:
        """Refuse ``ftp://x`` or a bad bucket name now, not after calibration."""
        from bevfusion_ptq.errors import ConfigError
        from bevfusion_ptq.s3.url import parse_url

        try:
            parse_url(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _encryption_needs_s3(self) -> PTQParams:
        if (self.sse or self.sse_kms_key_id) and not self.publishes_to_s3:
            raise ValueError(f"--sse and --sse-kms-key-id apply to s3:// outputs only, not to {self.output!r}")
        if self.sse_kms_key_id and self.sse != "aws:kms":
            raise ValueError("--sse-kms-key-id needs --sse aws:kms")
        return self

    @model_serializer(mode="wrap")
    def _omit_unset_optionals(self, handler: Any) -> dict[str, Any]:
        """Dumps leave out optional fields that are None and default to None (see
        :func:`_form_schema`); a None that switches off a check with another default stays."""
        fields = type(self).model_fields
        return {
            k: v for k, v in handler(self).items()
            if v is not None or (k in fields and fields[k].get_default(call_default_factory=True) is not None)
        }

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
