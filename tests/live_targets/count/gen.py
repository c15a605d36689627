# SPDX-License-Identifier: GPL-2.0-only
"""Generate and build the counting target: N tiny functions compiled with
``-pg -mfentry -mnop-mcount -mrecord-mcount`` and T threads calling them.

The program (see ``count_target.c``) counts its own calls: every
``fNNNNN`` adds 1 to ``calls[NNNNN]`` itself.  Two modes:

``window``  the threads are idle (spinning on a generation number, calling
            nothing instrumented) until SIGUSR1; then each thread makes
            exactly ROUNDS rounds over every function -- thread t calls f_i
            ``1 + (i + t) % 3`` times per round -- and the main thread writes
            the per-function counts of that window to OUT and prints
            ``window <gen>`` on stdout.  The comparison with a live count
            whose sites were switched on before the SIGUSR1 and off after
            the line is exact.
``busy``    the threads call every function in a hot loop from the start;
            SIGUSR1 makes the main thread write a snapshot of the counts to
            OUT and print ``snapshot <k>``.

It prints ``ready <pid>`` once every thread runs; SIGTERM makes it write
the counts and exit 0.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).parent
TEMPLATE = HERE / "count_target.c"


def source(n: int) -> str:
    lines = [f"#define NFUNCS {n}", TEMPLATE.read_text()]
    for i in range(n):
        lines.append(f"FN({i:05d}, {i})")
    lines.append("static void (*const table[NFUNCS])(void) = {")
    lines.extend(f"  f{i:05d}," for i in range(n))
    lines.append("};")
    lines.append("#include \"count_main.h\"")
    return "\n".join(lines) + "\n"


#: the entry forms the target can be built with
FORMS = {
    "nop-mcount": ["-fno-pie", "-no-pie", "-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount"],
    "patchable": ["-fpie", "-pie", "-fpatchable-function-entry=5"],
    # a PIE's fentry call goes through the GOT: call *__fentry__@GOTPCREL(%rip), ff 15
    "pie-fentry": ["-fpie", "-pie", "-pg", "-mfentry", "-mrecord-mcount"],
}


def build(n: int, outdir: Path, *, pie: bool = False, extra: tuple[str, ...] = (),
          form: str | None = None) -> Path:
    """Compile the n-function target into *outdir* (cached by content);
    *form*: one of :data:`FORMS` (``pie=True`` is ``"patchable"``)."""
    if shutil.which("gcc") is None:
        raise RuntimeError("gcc is not installed")
    src = source(n)
    form = form or ("patchable" if pie else "nop-mcount")
    flags = (["-O1", "-pthread", "-fno-inline", "-fno-ipa-icf", "-fno-optimize-sibling-calls"]
             + FORMS[form] + list(extra))
    key = hashlib.sha256((src + (HERE / "count_main.h").read_text() + " ".join(flags)).encode()).hexdigest()[:16]
    exe = Path(outdir) / f"count_target_{n}_{key}"
    if exe.exists():
        return exe
    c = Path(outdir) / f"count_target_{n}_{key}.c"
    c.write_text(src)
    tmp = exe.with_suffix(".tmp")
    subprocess.run(["gcc", *flags, "-I", str(HERE), "-o", str(tmp), str(c)], check=True)
    os.replace(tmp, exe)
    return exe
