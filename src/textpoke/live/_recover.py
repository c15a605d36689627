# SPDX-License-Identifier: GPL-2.0-only
"""What a dead patcher left, found and undone: ``textpoke live recover``
and ``textpoke live sites --check``.

:func:`check` reads the journal (:mod:`._journal`) and the process without
stopping it: sites of the journal whose first byte is an INT3, sites still
switched to a CALL into an injected stub region, the regions and the
SIGTRAP guard still mapped.

:func:`recover` attaches (adopting the journal of a dead patcher) and
undoes them, in this order:

1. every journal site whose first byte reads INT3 is put back whole -- its
   old tail (when the tail had been written) and its old first byte -- with
   every thread stopped and none strictly inside it (a thread waiting at
   the site in the guard handler runs the old instruction when resumed);
2. every stub region: the sites still calling into it are switched back to
   their original bytes in one batch of the INT3 protocol, then the region
   is unmapped once no thread is in it or has a return address into it
   (as ``live count`` frees it); a thread whose GS base points into a
   region so freed (``live probe``'s rings, ``live trace``'s per-thread
   records) gets it back as it was before the patcher set it, 0 (the live
   machine sets only a base that was 0, or pointed at nothing mapped; a
   thread made since inherited its creator's), after the unmap: no code
   that reads %gs is reachable by then, and a base the program set itself
   is elsewhere and left alone (``gs_restored`` counts them);
3. the guard: the target's own SIGTRAP action is put back and the handler
   unmapped once no thread is in it; the journal is removed;
4. a bootstrap routine left in a segment's slack (a patcher killed inside
   its first mmap or last munmap) is overwritten with the file's bytes.
"""

from __future__ import annotations

import os

from ._journal import Journal, JournalBusy
from ._process import check_not_exited, read_maps

__all__ = ["check", "recover"]


def _read(pid: int):
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    return fd


def gs_bases(pid: int) -> dict[int, int] | None:
    """The GS base of every thread of *pid* as the kernel has it, read with
    PTRACE_GETREGS: each thread seized, interrupted, read and let go at
    once (a signal that arrived in between is given back to it).  None
    when a thread cannot be seized (another tracer: a live patcher)."""
    from . import _ptrace as P
    out: dict[int, int] = {}
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return None
    for tid in tids:
        try:
            P.seize(tid, 0)
        except OSError as e:
            if e.errno == 3:                    # ESRCH: gone meanwhile
                continue
            return None
        sig = 0
        try:
            P.interrupt(tid)
            info = P.SigInfo()
            while True:
                if P.waitid(tid, info, True) == -4:      # EINTR
                    continue
                break
            if info.si_pid == 0 or info.si_code not in (P.CLD_TRAPPED, P.CLD_STOPPED):
                continue                        # it exited
            st = info.si_status
            if st >> 8 == 0 and st & 0x7F:
                sig = st & 0x7F                 # a signal-delivery-stop: give it back
            out[tid] = P.getregs(tid, P.UserRegs()).gs_base
        except OSError:
            pass
        finally:
            try:
                P.detach(tid, sig)
            except OSError:
                pass
    return out


def check(pid: int) -> dict:
    """What a patcher left in *pid* (nothing changes the process; when a
    dead patcher left regions, each thread is stopped for a moment to read
    its GS base: :func:`gs_bases`)."""
    j = Journal.load(pid)
    out = {"journal": None, "patcher": None, "patcher_alive": False, "int3_sites": [],
           "calls_into_stubs": 0, "stub_regions_mapped": [], "guard_mapped": False,
           "gs_into_regions": 0}
    if j is None:
        return out
    d = j.data
    out.update(journal=str(j.path), patcher=d["patcher"], patcher_alive=j.patcher_alive,
               summary=j.summary())
    maps = read_maps(pid)
    mapped = {m.start for m in maps}
    fd = _read(pid)
    try:
        for a in d["sites"]:
            try:
                if os.pread(fd, 1, int(a)) == b"\xcc":
                    out["int3_sites"].append(f"{int(a):#x}")
            except OSError:
                pass
        for r in d["regions"]:
            if r["base"] in mapped:
                out["stub_regions_mapped"].append(f"{r['base']:#x}")
            for a, _old, new in r["sites"]:
                nb = bytes.fromhex(new)
                try:
                    if os.pread(fd, len(nb), a) == nb:
                        out["calls_into_stubs"] += 1
                except OSError:
                    pass
        g = d["guard"]
        out["guard_mapped"] = bool(g and g["base"] in mapped)
    finally:
        os.close(fd)
    if d["regions"] and not out["patcher_alive"]:
        # threads whose GS base a dead patcher left pointing into its
        # regions (live probe's rings, live trace's records): recover puts
        # them back once the region is freed.  None: could not be read
        spans = [(r["base"], r["base"] + r["code_size"] + r["data_size"]) for r in d["regions"]]
        bases = gs_bases(pid)
        out["gs_into_regions"] = None if bases is None else sum(
            1 for gs in bases.values() if any(lo <= gs < hi for lo, hi in spans))
    return out


def leftovers(c: dict) -> bool:
    """A dead patcher's leftovers in a :func:`check` result."""
    return bool(c["journal"]) and not c["patcher_alive"]


def recover(pid: int, *, strategy: str = "int3") -> dict:
    """Undo what a dead patcher left in *pid* (see the module doc); returns
    what was done.  Nothing to do without a journal."""
    from ._count import switch_sites
    from ._machine import LiveMachine
    rep = {"pid": pid, "journal": False, "int3_restored": 0, "calls_restored": 0,
           "regions_freed": 0, "gs_restored": 0, "guard_removed": False, "kept": []}
    check_not_exited(pid)
    j = Journal.load(pid)
    if j is None:
        return rep
    if j.patcher_alive and j.data["patcher"] != os.getpid():
        raise JournalBusy(pid, f"textpoke pid {j.data['patcher']} is patching this process "
                               f"({j.summary()}): nothing to recover")
    rep["journal"] = True
    rep["found"] = j.summary()
    with LiveMachine(pid, strategy=strategy, recover=True) as m:
        jj = m.journal
        d = jj.data
        # 1. sites with an INT3: put back whole, every thread stopped
        writes = []
        for a, (first, old_tail, _new_tail) in sorted(d["sites"].items(), key=lambda kv: int(kv[0])):
            addr = int(a)
            if m.text_read(addr, 1)[0] == 0xCC:
                writes.append((addr, bytes.fromhex(first) + bytes.fromhex(old_tail)))
        if writes:
            m.write_stopped(writes)
        rep["int3_restored"] = len(writes)
        jj.clear_sites()
        g = d["guard"]
        if g and g.get("restored"):            # half-removed: its action is back already
            why = m._guard_remove()
            if why:
                rep["kept"].append("SIGTRAP guard: " + "; ".join(why))
        # 2. stub regions
        code_kept = False
        for r in sorted(d["regions"], key=lambda r: r["kind"] == "data"):
            held = _still_used(m, r, code_kept)
            if held:
                # a machine's execmem with code in it (a chunk never freed:
                # a site may still reach it), or data such code may use
                code_kept = True
                rep["kept"].append(f"{r['kind']} region {r['base']:#x}: {held}")
                jj.drop_region(r["base"])
                continue
            back = []
            for a, old, new in r["sites"]:
                nb = bytes.fromhex(new)
                if m.text_read(a, len(nb)) == nb:
                    back.append((a, bytes.fromhex(old)))
            if back:
                from ._fentry import QUIESCENT, classify
                quiet = [w for w in back if classify(w[1]) in QUIESCENT]
                batch = [w for w in back if classify(w[1]) not in QUIESCENT]
                if batch:
                    switch_sites(m, batch)
                if quiet:
                    m.write_stopped(quiet)
            rep["calls_restored"] += len(back)
            _free_stub_region(m, r, rep, mapped=r["base"] in {mm.start for mm in read_maps(pid)})
        had_guard = m._guard is not None
    jr = m.journal
    for _session in range(3):
        # as live count does: threads of a -pg program may stay at their
        # SIGPROF handler's entry (a stub address in its frame) while traced;
        # let them run untraced for a moment and look again
        stuck = list(jr.data["regions"]) if any(k.startswith("stub region") for k in rep["kept"]) else []
        if not stuck:
            break
        import time
        time.sleep(0.01)
        rep["kept"] = [k for k in rep["kept"] if not k.startswith("stub region")]
        with LiveMachine(pid, strategy=strategy, recover=True) as m2:
            for r in list(m2.journal.data["regions"]):
                _free_stub_region(m2, r, rep)
            jr = m2.journal
    rep["guard_removed"] = had_guard and not m.guard_kept
    if m.guard_kept:
        rep["kept"].append("SIGTRAP guard: " + "; ".join(m.guard_kept))
    # a patcher killed inside a call run from the bootstrap left its routine
    # in a segment's slack (unused bytes): the file's bytes back
    from ._inject import clean_bootstrap
    rep["bootstrap_cleaned"] = clean_bootstrap(pid)
    return rep


def _free_stub_region(m, r: dict, rep: dict, *, mapped: bool = True) -> None:
    """Stub region *r* (its journal entry) unmapped, unless a thread may
    still run in it (then kept, the reason in ``rep["kept"]``); once freed
    (or found unmapped already: *mapped* False) the GS bases pointing into
    it are put back and its journal entry dropped."""
    from ._inject import find_syscall_insn
    from ._region import Region
    region = Region(m.pid, r["base"], r["code_size"], r["data_size"],
                    syscall_at=find_syscall_insn(m.pid))
    why = _free(m, region, r) if mapped else []
    region.close()
    if why:
        rep["kept"].append(f"stub region {r['base']:#x}: " + "; ".join(why))
    else:
        rep["regions_freed"] += 1
        rep["gs_restored"] += m.reset_percpu_bases(region.base, region.end)
        m.journal.drop_region(r["base"])


def _free(m, region, r: dict) -> list[str]:
    """Unmap a stub region once no thread can be in it.  ``live trace``'s
    runtime makes CALLs of its own (dead return addresses stay on stacks):
    its own check tells those from a thread really inside, after putting
    back the return addresses its profiler hooked."""
    if r["kind"] == "trace":
        from ._trace import free_region
        return free_region(m, region, unhook=r.get("unhook"))
    from ._count import _read_and_free
    return _read_and_free(m, region, 0)[1]


def _still_used(m, r: dict, code_kept: bool) -> str:
    """Why a region a live machine mapped (``execmem``, ``data``; not a
    ``count`` stub region, whose sites the journal lists) must stay."""
    if r["kind"] == "execmem" and r["base"] in {mm.start for mm in read_maps(m.pid)}:
        if m.mem.read(r["base"], r["code_size"]).strip(b"\xcc\x00"):
            return "code still in it (a chunk never freed)"
    if r["kind"] == "data" and code_kept:
        return "code that may use it stays"
    return ""
