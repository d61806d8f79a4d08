"""Moving ``<model>/latest.json``: compare-and-swap, forward only in creation time.

Two runs publishing at once both read the pointer, and each writes only if it is still the
one it read (S3: ``IfMatch`` on its ETag; new pointer: ``IfNoneMatch="*"``). The loser
re-reads and decides again, so the pointer ends at the newest ``created_at`` whatever the
interleaving, and never moves back to an older version.
"""

from __future__ import annotations

import json
import logging

from bevfusion_ptq.errors import FetchError, TransientStorageError
from bevfusion_ptq.s3.manifest import LATEST, created_at
from bevfusion_ptq.s3.store import Store

log = logging.getLogger(__name__)

# Each lost swap means another publisher moved the pointer; this many in a row is not a race
# any more but something rewriting latest.json in a loop.
MAX_SWAPS = 32


def read_latest(store: Store, model: str) -> tuple[dict, str] | None:
    """The pointer and its change token, or None if nothing was published yet."""
    found = store.read(f"{model}/{LATEST}" if model else LATEST)
    if found is None:
        return None
    where = store.loc.display(model, LATEST)
    try:
        record = json.loads(found[0])
        if not isinstance(record, dict) or not {"version", "manifest"} <= record.keys():
            raise ValueError("missing version or manifest")
    except ValueError as exc:
        raise FetchError(f"{where}: not a latest pointer ({exc})") from None
    return record, found[1]


def advance_latest(store: Store, model: str, record: dict) -> bool:
    """Point ``latest`` at ``record`` unless it already points at it or at something newer."""
    where = store.loc.display(model, LATEST)
    payload = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
    ours = created_at(record, "new latest record")
    for _ in range(MAX_SWAPS):
        current = read_latest(store, model)
        token = None
        if current is not None:
            cur, token = current
            if cur.get("version") == record["version"]:
                log.info("%s already points at %s", where, record["version"])
                return False
            if created_at(cur, where) >= ours:
                log.info("%s stays at %s (created %s, not older than %s)", where, cur["version"],
                         cur.get("created_at"), record["created_at"])
                return False
        if store.swap(f"{model}/{LATEST}", payload, token):
            log.info("%s -> %s", where, record["version"])
            return True
        log.info("%s changed while we moved it; reading it again", where)
    raise TransientStorageError(f"{where} changed {MAX_SWAPS} times while we tried to move it")
