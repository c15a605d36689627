# SPDX-License-Identifier: GPL-2.0-only
"""Building a small C program with gcc at run time: what the live demo's
workload and the live rigs' loader both do (a missing gcc is a clear
error, not a traceback; a failed build says gcc's own words)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

__all__ = ["build_c"]


def build_c(outdir: str | Path, source: str, text: str, exe: str, flags: list[str], *,
            more: tuple[str | Path, ...] = (), error: type[Exception], user: str,
            thing: str, product: str) -> Path:
    """Write *text* to *outdir*/*source* and link it (with the files
    *more*) into *outdir*/*exe* with gcc *flags*; return the executable.
    Raises *error*: "the *user* builds its *thing* with gcc at run time"
    when gcc is not installed, "building the *product* failed" with gcc's
    messages when the build fails."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise error(f"the {user} builds its {thing} with gcc at run time, and gcc is "
                    "not installed (apt install gcc)")
    out = Path(outdir)
    (out / source).write_text(text)
    path = out / exe
    r = subprocess.run([gcc, *flags, "-o", str(path), str(out / source), *map(str, more)],
                       capture_output=True, text=True)
    if r.returncode:
        raise error(f"building the {product} failed:\n{r.stderr.strip()}")
    return path
