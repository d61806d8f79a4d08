"""When a failed task is worth another attempt: the one retry rule of every task."""

from __future__ import annotations

from typing import Any

from bevfusion_ptq.errors import PTQError, TransientStorageError


def retry_unless_input_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry failures another attempt might not repeat: outages (a storage error that is
    transient) and anything unexpected (CUDA out of memory, a killed worker); never the other
    PTQErrors (a bad config, a missing file, a key mismatch), which would fail the same way."""
    try:
        state.result()
    except TransientStorageError:
        return True
    except PTQError:
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient
        return True
    return True
