# SPDX-License-Identifier: GPL-2.0-only
"""textpoke: the Linux kernel's x86 text-patching machinery in Python.

The core (:class:`TextPoke`) patches any :class:`Machine`; the sim backend
(:mod:`textpoke.sim`) is an emulated SMP x86-64 machine on Unicorn, and
:mod:`textpoke.testing` holds an in-memory machine for tests.  The batch's
data structures, the protocol steps and the emulation helpers are in
:mod:`textpoke.lowlevel`.

    >>> from textpoke import TextPoke
    >>> from textpoke.sim import boot_workload
    >>> with boot_workload(ncpus=4) as w, TextPoke(w.sim) as core:
    ...     w.start()
    ...     site = w.by_name["nop5_jmp32"]
    ...     with core.batch():
    ...         core.smp_text_poke_batch_add(site.addr, site.new)
"""

import importlib as _importlib

__version__ = "0.1.0"

#: public name -> the module that defines it.  Nothing is imported until a
#: name is first used (PEP 562), so that ``textpoke --version`` and every
#: command import only what they need (iced-x86, Unicorn, rich are slow to
#: load).  To add public names: add a line here and the name to __all__.
_LAZY: dict[str, str] = {}


def _lazy(module: str, *names: str) -> None:
    for n in names:
        _LAZY[n] = module


_lazy("._alternative", "AlternativeError", "BootResult", "SelfTestError", "SmpAlternatives",
      "add_nop", "alternative_instructions", "alternatives_enable_smp", "alternatives_smp_lock",
      "alternatives_smp_module_add", "alternatives_smp_module_del", "alternatives_smp_unlock",
      "alternatives_text_reserved", "apply_alternatives", "apply_retpolines", "apply_returns",
      "apply_seal_endbr", "optimize_nops", "text_poke_apply_relocation")
_lazy("._core._emulate", "PtRegs")
_lazy("._core._events", "TextPokeEvent", "TextPokeEventLog")
_lazy("._core._insn", "ASM_NOP_MAX", "CALL_INSN_OPCODE", "CALL_INSN_SIZE", "INT3_INSN_OPCODE",
      "INT3_INSN_SIZE", "JMP8_INSN_OPCODE", "JMP8_INSN_SIZE", "JMP32_INSN_OPCODE",
      "JMP32_INSN_SIZE", "MAX_PATCH_LEN", "RET_INSN_OPCODE", "RET_INSN_SIZE",
      "TEXT_POKE_MAX_OPCODE_SIZE", "insn_decode_kernel", "text_gen_insn", "x86_nops")
_lazy("._core._machine", "Capability", "Machine", "TextRange", "TrapHandle", "TrapPriority")
_lazy("._core._textpoke", "TextPoke")
_lazy("._core._types", "TEXT_POKE_ARRAY_MAX", "TextMutex")
_lazy("._errors", "BadAddressError", "BadInstructionError", "MachineClosedError", "MachineError",
      "NotSupportedError", "OverlapError", "TextMutexError", "TextPokeError",
      "VerifyMismatchError")


# the clients and the Kernel object that creates them
_lazy(".kernel", "Kernel")
_lazy("._jump_label", "StaticKeys", "StaticKey", "JumpLabelError", "StaticKeyError",
      "StaticKeyWarning", "UnknownKeyError")
_lazy("._static_call", "StaticCalls", "StaticCall", "StaticCallError", "UnknownCallError")
_lazy("._ftrace", "Ftrace", "RingBuffer", "TraceEntry", "FtraceBugError", "FtraceDisabledError",
      "FtraceFilterError")
_lazy("._ftrace._graph", "FunctionGraph", "GraphError")
_lazy("._kprobes", "Kprobes", "Kprobe", "Kretprobe", "KprobeError")
_lazy("._module", "ModuleLoader", "Module")
_lazy("._module._link", "ModuleError", "ModuleFormatError", "ModuleRelocationError",
      "UnknownSymbolError")
_lazy("._bpf", "BpfJit", "BpfProg", "BpfTextPokeBusy", "BpfTextPokeInvalid", "bpf_arch_text_poke",
      "BPF_MOD_CALL", "BPF_MOD_JUMP")
_lazy("._execmem", "ExecMem", "ExecMemError")


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'textpoke' has no attribute {name!r}")
    value = getattr(_importlib.import_module(mod, __name__), name)
    globals()[name] = value          # next time: a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    # the text-patching state of a machine
    "TextPoke", "TextMutex", "TEXT_POKE_ARRAY_MAX", "TEXT_POKE_MAX_OPCODE_SIZE",
    # machines
    "Machine", "TextRange", "Capability", "TrapPriority", "TrapHandle", "PtRegs",
    # events
    "TextPokeEvent", "TextPokeEventLog",
    # instructions
    "insn_decode_kernel", "text_gen_insn", "x86_nops",
    "INT3_INSN_OPCODE", "INT3_INSN_SIZE", "CALL_INSN_OPCODE", "CALL_INSN_SIZE",
    "JMP32_INSN_OPCODE", "JMP32_INSN_SIZE", "JMP8_INSN_OPCODE", "JMP8_INSN_SIZE",
    "RET_INSN_OPCODE", "RET_INSN_SIZE", "MAX_PATCH_LEN", "ASM_NOP_MAX",
    # boot-time patching and relocation
    "alternative_instructions", "apply_alternatives", "apply_retpolines", "apply_returns",
    "apply_seal_endbr", "alternatives_smp_lock", "alternatives_smp_unlock",
    "alternatives_enable_smp", "alternatives_text_reserved", "alternatives_smp_module_add",
    "alternatives_smp_module_del", "SmpAlternatives", "BootResult",
    "AlternativeError", "SelfTestError",
    "text_poke_apply_relocation", "optimize_nops", "add_nop",
    # the clients, and a booted kernel that creates them (kernel.keys, .calls, ...)
    "Kernel", "StaticKeys", "StaticKey", "StaticCalls", "StaticCall", "Ftrace", "RingBuffer",
    "TraceEntry", "FunctionGraph", "Kprobes", "Kprobe", "Kretprobe", "ModuleLoader", "Module",
    "BpfJit", "BpfProg", "bpf_arch_text_poke", "BPF_MOD_CALL", "BPF_MOD_JUMP", "ExecMem",
    "JumpLabelError", "StaticKeyError", "StaticKeyWarning", "UnknownKeyError", "StaticCallError",
    "UnknownCallError", "FtraceBugError", "FtraceDisabledError", "FtraceFilterError",
    "GraphError", "KprobeError", "ModuleError", "ModuleFormatError", "ModuleRelocationError",
    "UnknownSymbolError", "BpfTextPokeBusy", "BpfTextPokeInvalid", "ExecMemError",
    # errors
    "TextPokeError", "BadInstructionError", "BadAddressError", "OverlapError",
    "TextMutexError", "VerifyMismatchError", "MachineError", "MachineClosedError",
    "NotSupportedError",
]
