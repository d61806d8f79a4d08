"""One error hierarchy for the package.

Every failure a user can fix (a bad file, a wrong key, a quantizer that saw no data)
raises a subclass of :class:`PTQError` whose message names the file, key, quantizer or
batch. The CLI turns these into one line and a distinct exit code; the flow marks them as
not retryable, because retrying cannot fix the input.
"""

from __future__ import annotations


class PTQError(Exception):
    """Base class: a failure caused by the inputs, not by the machine."""

    exit_code = 2


class ConfigError(PTQError):
    """Unknown config name, unreadable config file, or an invalid parameter."""

    exit_code = 3


class CheckpointError(PTQError):
    """Checkpoint file missing, unreadable, or not matching the model's keys and shapes."""

    exit_code = 4


class DatasetError(PTQError):
    """Missing or malformed calibration data: a file, a field, a size, non-finite values."""

    exit_code = 5


class CalibrationError(PTQError):
    """Calibration produced no usable scale: non-finite activations, or a quantizer never fed."""

    exit_code = 6


class QuantizationRuleError(PTQError):
    """A declared quantization rule does not fit the model (unmatched path or module type)."""

    exit_code = 7


class PublishError(PTQError):
    """Publishing or fetching artifacts failed verification or could not complete."""

    exit_code = 8


class TransientStorageError(PTQError):
    """The store could not be reached, kept failing (5xx, throttling) after botocore's own
    retries, or did not read back what was written. Retrying later may succeed, so unlike the
    other errors the flow does retry it."""

    exit_code = 12


class FetchError(PTQError):
    """Nothing to fetch: no ``latest.json``, a version without manifest (unfinished or
    unknown), or a manifest that is not one of ours."""

    exit_code = 13


class VerificationError(PTQError):
    """A file's size or sha256 differs from its manifest entry (local before upload, or after
    download): the bytes are not the ones the manifest vouches for."""

    exit_code = 14


class ExportError(PTQError):
    """The calibrated model cannot be written as the deployment files (an unsupported module,
    an unfolded BatchNorm, a graph that ``onnx.checker`` rejects, a missing version file)."""

    exit_code = 15


class DiskError(PTQError):
    """The output or state directory is read-only, not writable, or has no room left."""

    exit_code = 16


class GateFailedError(PTQError):
    """The INT8 model fell outside the gate's thresholds (mAP or NDS drop against FP32, or the
    fidelity cosine). The version is kept locally, unpublished, with ``evaluation.json``
    saying which threshold failed and by how much; ``latest`` did not move."""

    exit_code = 17
