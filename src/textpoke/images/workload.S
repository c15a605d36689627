/* SPDX-License-Identifier: GPL-2.0-only
 *
 * The sim machine's guest workload.  Every vCPU runs workload_main in a
 * loop, passing through one patch site of each kind the batch supports.
 * Each site sets %eax to the variant that ran (1 = old, 2 = new; 3 = a Jcc
 * that correctly fell through; 4 = a Jcc whose direction contradicts the
 * flags; 0 = nothing ran) and counts it in the per-CPU record at %rbx:
 *
 *   [rbx + 0]                 iterations completed
 *   [rbx + 64 + site*64 + v*8] times variant v ran at this site
 *
 * The .textpoke_sites table (address, new target, kind, length) tells the
 * host how to build each site's "new" instruction.
 *
 * Registers: rbx per-CPU record, r12 iteration count, r15 iterations left
 * before the preemption point (free-running scheduler; reloaded from
 * preempt_iters there).
 */
	.intel_syntax noprefix

	.set KIND_NOP_JMP8,   1
	.set KIND_NOP_JMP32,  2
	.set KIND_CALL,       3
	.set KIND_RET_JMP32,  4
	.set KIND_JCC32,      5
	.set KIND_NOP5_INT3,  6

	.macro SITE_ENTRY site, new_target, kind, len
	.pushsection .textpoke_sites, "a"
	.quad \site, \new_target
	.byte \kind, \len
	.zero 6
	.popsection
	.endm

	/* Count the variant in %eax for site number \n. */
	.macro RECORD n
	and eax, 7
	inc qword ptr [rbx + 64 + \n * 64 + rax * 8]
	.endm

	.macro NOP5
	.byte 0x0f, 0x1f, 0x44, 0x00, 0x00
	.endm

	.text
	.globl workload_main
	.type workload_main, @function
workload_main:
loop_top:
	/* site 0: NOP2 <-> JMP8 */
	xor eax, eax
	.globl site_nop2_jmp8
site_nop2_jmp8:
	.byte 0x66, 0x90
	mov eax, 1
	jmp 1f
nop2_new:
	mov eax, 2
1:	RECORD 0
	SITE_ENTRY site_nop2_jmp8, nop2_new, KIND_NOP_JMP8, 2

	/* site 1: NOP5 <-> JMP32 */
	xor eax, eax
	.globl site_nop5_jmp32
site_nop5_jmp32:
	NOP5
	mov eax, 1
join_nop5:
	RECORD 1
	SITE_ENTRY site_nop5_jmp32, nop5_new, KIND_NOP_JMP32, 5

	/* site 2: CALL retarget */
	xor eax, eax
	.globl site_call
site_call:
	call call_old
	RECORD 2
	SITE_ENTRY site_call, call_new, KIND_CALL, 5

	/* site 3: RET; INT3 x4 <-> JMP32 (a static-call trampoline) */
	mov eax, 1
	call tramp_ret
	RECORD 3
	SITE_ENTRY site_ret_jmp, ret_new, KIND_RET_JMP32, 5

	/* site 4: Jcc.d32 retarget; taken on even iterations */
	xor eax, eax
	test r12b, 1
	.globl site_jcc32
site_jcc32:
	.byte 0x0f, 0x84
	.long jcc_old - (. + 4)
	mov eax, 3
	test r12b, 1
	jnz join_jcc
	mov eax, 4
join_jcc:
	RECORD 4
	SITE_ENTRY site_jcc32, jcc_new, KIND_JCC32, 6

	/* site 5: NOP5 <-> JMP32 crossing a 64-byte line after its second
	 * byte, so either half alone makes a different instruction */
	xor eax, eax
	jmp site_xline_nop5
	.balign 64, 0xcc
	.skip 62, 0xcc
	.globl site_xline_nop5
site_xline_nop5:
	NOP5
	mov eax, 1
join_xnop5:
	RECORD 5
	SITE_ENTRY site_xline_nop5, xline_nop5_new, KIND_NOP_JMP32, 5

	/* site 6: Jcc.d32 crossing a line inside its displacement (3|3), with
	 * old and new targets differing in both low displacement bytes */
	xor eax, eax
	test r12b, 1
	jmp site_xline_jcc32
	.balign 64, 0xcc
	.skip 61, 0xcc
	.globl site_xline_jcc32
site_xline_jcc32:
	.byte 0x0f, 0x84
	.long xjcc_old - (. + 4)
	mov eax, 3
	test r12b, 1
	jnz join_xjcc
	mov eax, 4
join_xjcc:
	RECORD 6
	SITE_ENTRY site_xline_jcc32, xjcc_new, KIND_JCC32, 6

	/* site 7: NOP5 where a probe's INT3 may be installed (len 1) */
	mov eax, 1
	.globl site_probe
site_probe:
	NOP5
	RECORD 7
	SITE_ENTRY site_probe, site_probe, KIND_NOP5_INT3, 1

	/* optional straight-line sled of NOP5 sites (benchmarks) */
	mov rax, qword ptr [rip + sled_fn]
	test rax, rax
	jz 1f
	call rax
1:
	inc r12
	mov qword ptr [rbx], r12
	dec r15
	jnz loop_top
	.globl preempt_point
preempt_point:
	mov r15, qword ptr [rip + preempt_iters]
	jmp loop_top
	.size workload_main, . - workload_main

/* Targets live out of line so that a torn jump lands somewhere visible. */
	.balign 16, 0xcc
nop5_new:
	mov eax, 2
	jmp join_nop5

	.balign 16, 0xcc
call_old:
	mov eax, 1
	ret
	.balign 16, 0xcc
call_new:
	mov eax, 2
	ret

	.balign 16, 0xcc
	.globl tramp_ret
tramp_ret:
	.globl site_ret_jmp
site_ret_jmp:
	ret
	.byte 0xcc, 0xcc, 0xcc, 0xcc
	.balign 16, 0xcc
ret_new:
	mov eax, 2
	ret

	.balign 16, 0xcc
jcc_old:
	mov eax, 1
	jmp jcc_check
jcc_new:
	mov eax, 2
jcc_check:
	test r12b, 1
	jz 1f
	mov eax, 4
1:	jmp join_jcc

	/* INT3 filler around the cross-line Jcc targets: a displacement made
	 * of old and new bytes (old-new = 0x1a0) lands in it and traps */
	.balign 256, 0xcc
	.skip 256, 0xcc
xjcc_old:
	mov eax, 1
	jmp xjcc_check
	.org xjcc_old + 0x1a0, 0xcc
xjcc_new:
	mov eax, 2
xjcc_check:
	test r12b, 1
	jz 1f
	mov eax, 4
1:	jmp join_xjcc
	.skip 256, 0xcc

	.balign 16, 0xcc
xline_nop5_new:
	mov eax, 2
	jmp join_xnop5

	.balign 64, 0xcc

	.data
	.globl sled_fn
	.balign 8
sled_fn:
	.quad 0
	/* iterations between preemption points (free-running scheduler) */
	.globl preempt_iters
preempt_iters:
	.quad 16
