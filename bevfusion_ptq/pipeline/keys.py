"""Cache keys from content: what each stage's output depends on, and nothing else.

A stage's key combines the package version, the source of the stage function, the run
parameters that stage reads (:data:`STAGE_PARAMS`), and the identities of its inputs: the
checkpoint's sha256, the resolved config's hash, the dataset fingerprint and the keys of the
stages it consumes. Changing the calibration method therefore changes the keys of compute-amax
and what follows, while load-model, fuse-bn and collect-statistics keep theirs.

The same key names the stage's work directory (``<state>/work/<stage>/<key>/``) and is the
Prefect cache key of its task, so "cached" and "on disk" cannot disagree about what they hold.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import Callable
from typing import Any

from bevfusion_ptq import __version__
from bevfusion_ptq.hashing import data_sha256
from bevfusion_ptq.params import PTQParams

# The parameters each stage's output depends on. Fields not listed anywhere (device, output
# encryption, checkpoint interval) change where or how a run happens, not what it computes.
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "prepare_checkpoint": ("config", "checkpoint", "seed"),
    "build_dataset": ("config", "data_root", "calib_batches", "calib_sampling", "calib_pipeline", "seed"),
    "load_model": (),
    "insert_quantizers": (),
    "fuse_bn": (),
    "collect_statistics": ("calib_batches",),
    "compute_amax": ("calib_method", "percentile", "exclude"),
    "sensitivity": ("calib_method", "percentile", "sensitivity_metric", "sensitivity_groups"),
    "fidelity": ("fidelity_batches",),
    "evaluate": ("eval_samples", "eval_version", "eval_split", "seed"),
    "save_artifacts": ("output",),
    "export": ("export",),
}


@functools.cache
def _source_hash(fn: Callable[..., Any]) -> str:
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()


def stage_key(stage: str, fn: Callable[..., Any], params: PTQParams | None, **inputs: Any) -> str:
    """``<stage>-<hash>``: readable in the work directory, safe as a lock-file name."""
    chosen = {name: getattr(params, name) for name in STAGE_PARAMS[stage]} if params is not None else {}
    digest = data_sha256(
        {"stage": stage, "package": __version__, "source": _source_hash(fn), "params": chosen, "inputs": inputs}
    )
    return f"{stage.replace('_', '-')}-{digest[:40]}"
