# SPDX-License-Identifier: GPL-2.0-only
"""Failure reports: oopses printed as the kernel prints them, with the
right symbol, the faulting address and the code this CPU executed; and the
timeline of a traced run."""

import iced_x86 as I

from textpoke import TextPoke
from textpoke.sim import FINE, boot_workload, format_oops, format_timeline, oops_report, timeline
from textpoke.sim._report import symbolize
from textpoke.sim._workload import MODULE_BASE


def test_symbolize_follows_kallsyms():
    w = boot_workload(ncpus=1)
    im = w.image
    main = im.sym("workload_main")
    s = symbolize(main + 1, im)        # before the first label inside it
    assert s["name"] == "workload_main" and s["offset"] == 1
    assert s["text"] == f"workload_main+0x1/{im.sizes['workload_main']:#x}"
    site = w.by_name["nop5_jmp32"]
    s = symbolize(site.addr + 1, im)
    assert s["text"].startswith("site_nop5_jmp32+0x1/")
    assert s["function"].startswith("workload_main+")       # the label's enclosing function
    assert symbolize(0x10, im) is None
    w.close()


def test_stale_int3_oops_names_the_site_it_hit():
    """The no-sync-3 mutation leaves a stale INT3 in some CPU's view after
    the batch has gone: the report must name that site and mark the INT3."""
    found = None
    for seed in range(60):
        w = boot_workload(ncpus=3, seed=seed, policy=FINE, trace=True)
        core = TextPoke(w.sim, mutations=("no-sync-3",))
        w.start()
        w.sim.run(50 + seed)
        sites = [w.by_name[n] for n in ("nop5_jmp32", "call", "jcc32", "xline_nop5")]
        with core.batch():
            for s in sites:
                core.smp_text_poke_batch_add(s.addr, s.new)
        w.sim.run(3000)
        if w.sim.oopses:
            found = (w, core, sites)
            break
        w.close()
    assert found, "no-sync-3 never oopsed in 60 schedules"
    w, core, sites = found
    o = w.sim.oopses[0]
    rep = oops_report(o, w.image)
    hit = next(s for s in sites if s.addr == o.rip)
    assert rep["kind"] == "int3" and rep["cpu"] == o.cpu
    assert rep["rip_symbol"].startswith(f"site_{hit.name}+0x0/")
    assert "<cc>" in rep["code"]
    # the marked byte is the one at RIP, as this CPU's view held it
    before = rep["code"].split("<cc>")[0].split()
    assert len(before) == min(42, o.rip - w.sim.text_ranges[0].start)
    text = format_oops(rep)
    assert text.splitlines()[0].startswith("Oops: int3")
    assert f"CPU: {o.cpu} " in text and f"RIP: 0010:site_{hit.name}+0x0/" in text
    assert "RAX: " in text and "R15: " in text and "Code: " in text
    # the same report from the dict a worker process would send
    assert oops_report(o.as_dict(), w.image)["rip_symbol"] == rep["rip_symbol"]
    # the timeline shows the patcher's phases, the INT3 and the oops, in step order
    tl = timeline(w.sim, core, w.image)
    whats = [e["what"] for e in tl]
    assert {"poke/int3", "poke/tail", "poke/first", "write", "ipi-send", "ipi", "int3",
            "oops"} <= set(whats)
    assert [e["step"] for e in tl] == sorted(e["step"] for e in tl)
    oops_line = next(e for e in tl if e["what"] == "oops")
    assert oops_line["cpu"] == o.cpu and oops_line["addr"] == o.rip
    # the last INT3 that CPU took before the oops was not handled
    mine = [e for e in tl if e["cpu"] == o.cpu and e["what"] in ("int3", "iret", "unhandled")]
    assert mine[-1]["what"] == "unhandled"
    out = format_timeline(tl)
    assert len(out.splitlines()) == len(tl) and "patcher poke/first" in out
    w.close()


def test_page_fault_oops_reports_the_faulting_address():
    w = boot_workload(ncpus=2, seed=1, trace=True)
    sim = w.sim
    target = w.by_name["call"]
    enc = I.Encoder(64)        # mov byte ptr [rip -> site_call], 1
    enc.encode(I.Instruction.create_mem_i32(I.Code.MOV_RM8_IMM8,
                                            I.MemoryOperand(I.Register.RIP, displ=target.addr), 1),
               MODULE_BASE)
    code = bytes(enc.take_buffer())
    core = TextPoke(sim)
    core.text_poke_copy(MODULE_BASE, code)
    sim.start_cpu(0, MODULE_BASE)
    sim.run(50)
    o = sim.oopses[0]
    assert o.addr == target.addr and o.access == "write-prot"
    rep = oops_report(o, w.image)
    assert rep["addr_symbol"].startswith("site_call+0x0/")
    assert rep["rip_symbol"] is None                       # execmem: no symbols there
    assert rep["code"].split()[0] == f"<{code[0]:02x}>"    # nothing before the region start
    text = format_oops(rep)
    lines = text.splitlines()
    assert lines[0] == f"BUG: unable to handle page fault for address: {target.addr:016x}"
    assert "#PF: supervisor write access in kernel mode" in lines
    assert "#PF: error_code(0x0003) - permissions violation" in lines
    assert f"RIP: 0010:{MODULE_BASE:#x}" in text
    w.close()
