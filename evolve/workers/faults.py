"""TEST ONLY: faults a worker can be told to simulate (``WorkerSpec.fault_injection``).

The pools' isolation (a crashed or hung worker costs one job, a failed candidate none) is tested
against these; a real run never sets ``fault_injection``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

__all__ = ["inject"]


def inject(faults: dict[str, Any] | None, kind: str, eval_id: str) -> bool:
    """TEST ONLY fault hook: does fault ``kind`` fire for ``eval_id``?

    ``faults`` maps a kind to eval ids: ``raise`` (RuntimeError), ``nan`` (a merged weight set to
    NaN), ``exit`` (``os._exit(1)`` between merge and evaluation: a crashed worker), ``hang``
    (sleeps an hour: a stuck worker).  Ids also listed in ``once`` crash or hang on their first
    attempt only (a marker file in ``marker_dir`` outlives the worker process).
    """
    if not faults or eval_id not in faults.get(kind, ()):
        return False
    if kind in ("exit", "hang") and eval_id in faults.get("once", ()):
        marker = Path(faults["marker_dir"]) / f"{kind}-{eval_id.replace('/', '_')}"
        if marker.exists():
            return False
        marker.touch()
    if kind == "raise":
        raise RuntimeError(f"injected fault for {eval_id}")
    if kind == "exit":
        os._exit(1)
    if kind == "hang":
        time.sleep(3600)
    return True
