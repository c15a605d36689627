/* SPDX-License-Identifier: GPL-2.0-only
 *
 * Patch sites for BPF-style pokes (bpf_arch_text_poke): a NOP5 that
 * becomes a CALL to a JIT-ed program, and one that becomes a JMP to it.
 * A program is "int prog(long x)".  Until patched, both functions return
 * 7; bpf_call_site(x) returns prog(x) once called, and bpf_jmp_site(x)
 * returns what the program returns (it jumps there and the program's
 * RET returns to our caller).
 */
#include "linkage.h"

	.text
SYM_FUNC_START(bpf_call_site)
	mov	$7, %eax
SYM_INNER_LABEL(bpf_call_poke)
	.byte	0x0f, 0x1f, 0x44, 0x00, 0x00
	RET
SYM_FUNC_END(bpf_call_site)

SYM_FUNC_START(bpf_jmp_site)
SYM_INNER_LABEL(bpf_jmp_poke)
	.byte	0x0f, 0x1f, 0x44, 0x00, 0x00
	mov	$7, %eax
	RET
SYM_FUNC_END(bpf_jmp_site)
