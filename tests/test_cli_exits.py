# SPDX-License-Identifier: GPL-2.0-only
"""Issue 18's exit-code and input cases, one by one: what the command found
decides the status (never how stdout closed), checks made before any work,
output to a pipe never cut."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from textpoke import cli


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_2(rc, out, err, needle):
    assert rc == 2 and out == "", (rc, out, err)
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv, needle", [
    (("boot", "--image", "/dev/zero"), "character device"),
    (("boot", "--image", "/"), "directory"),
    (("boot", "--image", "/no/such/image"), "No such file"),
    (("boot", "--dump", "/tmp/textpoke-x.bin"), "give --image too"),
    (("boot", "--reference", __file__), "give --image too"),
    (("boot", "--sites"), "give --image too"),
    (("boot", "--image", __file__, "--dump", "/dev/full"), "not a regular file"),
    (("boot", "--image", __file__, "--dump", "/"), "directory"),
    (("boot", "--image", __file__, "--dump", "/no/such/dir/x"), "no directory"),
    (("boot", "--cpu-caps", "1,,2"), "empty word"),
    (("boot", "--cpu-caps", "0x100000000"), "0..0xffffffff"),
    (("boot", "--dentry-hashtable", "-1"), "--dentry-hashtable"),
    (("boot", "--dentry-hashtable", hex(1 << 79)), "--dentry-hashtable"),
    (("boot", "--mem", "0"), "1M..64T"),
    (("boot", "--its-page", "-1"), "--its-page"),
    (("boot", "--its-page", "0x1001"), "page-aligned"),
    (("boot", "--x86-idle", ""), "not a symbol name"),
    (("boot", "--return-thunk", "0xZZ"), "--return-thunk"),
    (("boot", "--cmdline", "maxcpus=lots"), "maxcpus"),
    (("boot", "--debug-alternative", "abc"), "unknown record kind 'abc'"),
    (("boot", "--debug-alternative", "0x40"), "0x1..0x1f"),
    (("static-call", "--update", "sc_op", "0xZZ"), "not a hexadecimal address"),
    (("static-call", "--update", "sc_op", hex(1 << 64)), "64-bit"),
    (("ftrace", "--cpus", "8", "--buffer-size", "262144"), "--buffer-size 131072 with --cpus 8"),
    (("ftrace", "--functions", "[" * 50_000), "at most 256"),
    (("ftrace", "--functions", ","), "empty glob list"),
    (("verify", "--line-sizes", "abc"), "--line-sizes belongs to --report"),
    (("verify", "--report", "/tmp", "--line-sizes", "3"), "powers of two"),
    (("verify", "--report", "/tmp", "--line-sizes", "x,64"), "comma-separated"),
    (("verify", "--report", "/dev/zero"), "not a directory"),
    (("verify", "--report", "/no/such/dir/report"), "not a writable directory"),
    (("verify", "--resume", "/dev/zero"), "character device"),
    (("verify", "--resume", "/"), "directory"),
    (("verify", "--resume", "/no/such/dir/resume"), "no directory"),
    (("verify", "--report", "x" * 300), "name too long"),
    (("verify", "--bound", "junk"), "--bound belongs to --exhaustive"),
    (("verify", "--state", "/tmp/x"), "--state belongs to --exhaustive"),
    (("verify", "--path", "x"), "--path belongs to --exhaustive"),
    (("verify", "--exhaustive", "--scenario", "xline", "--state", "/dev/zero"),
     "character device"),
    # the first GLOB would be dropped without a word: refused, nothing attached
    (("live", "count", "--pid", "1", "--functions", "a", "--functions", "b"),
     "--functions given twice"),
    (("live", "toggle", "--pid", "1", "--functions", "a", "--functions", "b", "--to", "nop"),
     "--functions given twice"),
])
def test_refused_before_any_work(capsys, argv, needle):
    _one_line_2(*_main(capsys, *argv), needle)


def test_the_largest_ring_help_allows_works(capsys):
    rc, out, err = _main(capsys, "ftrace", "--cpus", "8", "--buffer-size", "131072",
                         "--duration", "50", "--json")
    assert rc == 0, err
    assert json.loads(out)["int3_left"] == 0


def test_kprobe_minimum_run_is_no_failure(capsys):
    """--passes 1 on one CPU: the CPU may finish its round without calling
    the probed function again; 0 hits then is not a failure, and hits are
    owed only for calls begun after arming."""
    rc, out, err = _main(capsys, "kprobe", "kprobe_target", "--cpus", "1", "--passes", "1",
                         "--json")
    d = json.loads(out)
    assert rc == (0 if d["nhit"] >= d["hits_owed"] else 1), d
    assert rc == 0


def test_kprobe_owes_hits_for_calls_after_arming(capsys, monkeypatch):
    """A probe whose handler never records a hit while the CPUs call the
    function: exit 1, the missing hits named."""
    import textpoke._kprobes as kprobes_pkg
    real = kprobes_pkg.Kprobes.register_kprobe

    def deaf(self, where, pre=None, *a, **kw):
        return real(self, where, lambda *_: None, *a, **kw)
    monkeypatch.setattr(kprobes_pkg.Kprobes, "register_kprobe", deaf)
    rc, out, err = _main(capsys, "kprobe", "kprobe_target", "--cpus", "2", "--passes", "3")
    assert rc == 1 and "owed" in out, out


def test_demo_fails_when_a_client_check_fails(capsys, monkeypatch):
    from textpoke.cli import demo

    def failing(cpus, seed, hold):
        return "ftrace: startup self-test: 12/13 checks passed", False
    monkeypatch.setattr(demo, "_CLIENT_STEPS", demo._CLIENT_STEPS[:1] + (failing,))
    rc, out, err = _main(capsys, "demo", "--toggles", "1", "--cpus", "1", "--no-boot")
    assert "12/13 checks passed  [FAILED]" in out
    assert rc == 1


def test_a_closed_pipe_exits_141_never_0():
    """Piped into a reader that stops at once: 141 (128 + SIGPIPE), as
    shells report tools killed by SIGPIPE -- whatever the run found."""
    code = ("import os, sys; r, w = os.pipe(); os.close(r); os.dup2(w, 1); "
            "from textpoke.cli import main; main()")
    p = subprocess.run([sys.executable, "-c", code, "boot", "--cpu-features", "list"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 141, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr


def test_output_to_a_pipe_is_never_cut(tmp_path):
    """Not a terminal: tables come out whole, no '…' (rich's 80 columns)."""
    out = tmp_path / "out"
    with open(out, "w") as f:
        p = subprocess.run([sys.executable, "-m", "textpoke", "demo", "--toggles", "2",
                            "--cpus", "2", "--no-boot"], stdout=f, stderr=subprocess.PIPE,
                           text=True, timeout=600, env={**os.environ, "COLUMNS": "80"})
    text = out.read_text()
    assert p.returncode in (0, 1), p.stderr
    assert "…" not in text, [ln for ln in text.splitlines() if "…" in ln][:3]
    assert any(len(ln) > 80 for ln in text.splitlines())
    for name in ("nop5_jmp32", "not-taken"):
        assert name in text


def test_textpoke_import_is_light():
    """`import textpoke` and the CLI's entry point load neither Unicorn,
    rich nor iced-x86; a command's --help loads only its own module."""
    code = ("import sys, textpoke, textpoke.cli; "
            "print(sorted(m for m in ('unicorn', 'rich', 'iced_x86', 'textpoke.sim', "
            "'textpoke.cli.demo') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "[]", (p.stdout, p.stderr)
    assert cli.__version__


def test_public_names_resolve_lazily():
    import textpoke
    for name in textpoke.__all__:
        assert getattr(textpoke, name) is not None, name
    assert set(textpoke.__all__) <= set(dir(textpoke))
    with pytest.raises(AttributeError):
        textpoke.no_such_name    # noqa: B018


def test_command_table_matches_the_modules():
    from textpoke.cli import COMMANDS, command_module
    for name, (_mod, help_) in COMMANDS.items():
        m = command_module(name)
        assert m.NAME == name and m.HELP == help_, name


def test_constants_repeated_for_fast_help_agree():
    from textpoke._ftrace._ring import FTRACE_CPUS
    from textpoke.cli import ftrace, keys
    from textpoke.sim._clients_demo import CLIENT_CPUS
    assert keys.CLIENT_CPUS == CLIENT_CPUS and ftrace.FTRACE_CPUS == FTRACE_CPUS
