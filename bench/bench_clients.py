# SPDX-License-Identifier: GPL-2.0-only
"""Static-key flip rate and module load time on running vCPUs.

    python bench/bench_clients.py [--repeat R] [--quick] [--json] [--clock cpu]

For keys of 1, 100 and 1,000 jump-label sites (jl_key_many_N in the
bundled image), a sim machine with 4 vCPUs runs the image's probe loop,
which passes through every site of the key all the time; each flip is one
static_key_enable or static_key_disable (all sites checked, queued and
applied with the SMP batch: ceil(N/256) batches of <= 3 syncs) while the
vCPUs keep running between the protocol's steps.  Figures: flips per
second, median and min-max of --repeat >= 5 rounds, the three sizes
interleaved piece by piece.  After the run, every CPU must return the
key's final state and no CPU may have oopsed.

Module load time: a generated module of 1,000 functions (each with a
jump label on jl_key_false and a static-call site of sc_op), built with
gcc once, loaded into execmem while the 4 vCPUs run the probe loop:
relocations, module_finalize's passes, 1,000 jump entries and 1,000
static-call sites put in their current state, text_poke_copy, one sync,
registration.  Each sample is one load (the unload between samples is
not timed); median and min-max of --repeat >= 5.  After the runs a loaded
copy is called from every CPU and the key flipped: the module's sites
must switch, with no oops.  Needs gcc (skipped with a note otherwise).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _stats import fmt, fmt_range, interleaved_rates, now, script_main, table  # noqa: E402

from textpoke.sim import ClientMachine  # noqa: E402

MODULE_FUNCTIONS = 1000

SIZES = (1, 100, 1000)


def run(args):
    flips = 2 if args.quick else 6
    machines = {}
    fns = {}
    for n in SIZES:
        cm = ClientMachine(cpus=4, seed=n)
        i = cm.add_probe(f"jl_many_{n}", allow=[0, n])
        cm.allow(i, [0, n], rng=(0, n))
        cm.start()
        cm.wait_passes(1)
        machines[n] = (cm, i)

        def piece(cm=cm, key=f"jl_key_many_{n}"):
            t0 = now()
            for _ in range(flips):
                if cm.keys.static_key_enabled(key):
                    cm.keys.static_key_disable(key)
                else:
                    cm.keys.static_key_enable(key)
            return flips, now() - t0
        fns[f"{n} sites"] = piece
    try:
        res = interleaved_rates(fns, args.repeat, chunks=4, units={k: "flips/s" for k in fns})
        res.update(module_load(args))
        checks = {}
        for n, (cm, i) in machines.items():
            want = n if cm.keys.static_key_enabled(f"jl_key_many_{n}") else 0
            wrong = cm.expect({i: want})
            checks[n] = {"oopses": cm.oopses, "bad": cm.bad(), "wrong": bool(wrong),
                         "batches": cm.core.stats.batches, "syncs": cm.core.stats.syncs}
            if cm.oopses or wrong or cm.bad():
                raise SystemExit(f"bench_clients: key of {n} sites misbehaved: {checks[n]}")
    finally:
        for cm, _ in machines.values():
            cm.close()
    return res, checks


def module_load(args) -> dict:
    """Load time of a generated module of MODULE_FUNCTIONS functions."""
    import tempfile

    from _stats import repeated

    from textpoke.images.build import have_gcc
    from textpoke.images.modules.build import build_module, many_functions_source
    if not have_gcc():
        print("bench_clients: no gcc, module load time not measured", file=sys.stderr)
        return {}
    n = MODULE_FUNCTIONS
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "mod_many.c"
        src.write_text(many_functions_source(n))
        obj = build_module(src, Path(tmp) / "mod_many.o").read_bytes()
    with ClientMachine(cpus=4, seed=7) as cm:
        cm.add_probe("jl_many_100", allow=[0, 100], )
        cm.start()
        cm.wait_passes(1)
        loader = cm.kernel.modules

        def one() -> float:
            for m in list(loader.modules.values()):
                loader.unload(m)
            t0 = now()
            loader.load(obj, name="mod_many")
            return now() - t0
        s = repeated(f"module of {n} functions", one, args.repeat, unit="s")
        m = loader.modules["mod_many"]
        if (m.jump_entries, m.static_call_sites) != (n, n):
            raise SystemExit(f"bench_clients: module has {m.jump_entries} jump entries, "
                             f"{m.static_call_sites} static-call sites")
        i = cm.add_probe("mod_fn_7", m.sym("mod_fn_7"), arg=1, allow=[16, 23])
        cm.keys.static_key_enable("jl_key_false")
        wrong = cm.expect({i: 23})
        if wrong or cm.oopses or cm.bad():
            raise SystemExit(f"bench_clients: loaded module misbehaved: {wrong} {cm.bad()} "
                             f"{cm.oopses} oopses")
    return {s.name: s}


def report(r) -> str:
    res, checks = r
    rows = [[k, fmt(s.median), fmt_range(s), f"{checks[int(k.split()[0])]['batches']}",
             f"{checks[int(k.split()[0])]['syncs']}"] for k, s in res.items()
            if not k.startswith("module")]
    out = ("static-key flips on 4 running vCPUs (median, min-max):\n"
           + table(["key", "flips/s", "range", "batches (all)", "syncs (all)"], rows))
    mods = [[k, fmt(s.median * 1e3), fmt_range(s, scale=1e-3)] for k, s in res.items()
            if k.startswith("module")]
    if mods:
        out += ("\n\nmodule load while 4 vCPUs run (median, min-max):\n"
                + table(["object", "ms", "range (ms)"], mods))
    return out


def to_json(r):
    res, checks = r
    return {"flip_rate": {k: s.as_dict() for k, s in res.items() if not k.startswith("module")},
            "module_load": {k: s.as_dict() for k, s in res.items() if k.startswith("module")},
            "checks": checks}


def main(argv=None) -> int:
    return script_main(argv, __doc__, "clients", run, report, to_json)


if __name__ == "__main__":
    raise SystemExit(main())
