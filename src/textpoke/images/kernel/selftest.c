// SPDX-License-Identifier: GPL-2.0-only
/*
 * The two boot self-tests of the kernel's alternative_instructions():
 *
 * int3_selftest(&val): the text at int3_selftest_ip is an INT3 followed by
 * four NOPs -- room for a 5-byte CALL.  A trap handler that recognises the
 * address is expected to emulate "call int3_magic", which stores 1 in *val.
 *
 * alt_reloc_selftest(): an empty original with a replacement that loads a
 * RIP-relative address and calls a function.  It returns 0 before
 * patching, 1 when both still reach their targets after the replacement
 * was copied and relocated, 2 when the address came out wrong.
 */
#include "types.h"
#include "alternative.h"

noinline __used void int3_magic(unsigned int *ptr)
{
	*ptr = 1;
}

noinline __used void int3_selftest(unsigned int *val)
{
	asm volatile(".globl int3_selftest_ip\n"
		     "int3_selftest_ip:\n\t"
		     "int3; nop; nop; nop; nop\n\t"
		     : : "D" (val) : "memory");
}

static int __alt_reloc_selftest_addr;
int alt_reloc_selftest_result;

noinline __used void __alt_reloc_selftest(void *arg)
{
	alt_reloc_selftest_result = arg == &__alt_reloc_selftest_addr ? 1 : 2;
}

noinline __used int alt_reloc_selftest(void)
{
	alt_reloc_selftest_result = 0;
	asm volatile(ALTERNATIVE("", "lea %[mem], %%rdi; call __alt_reloc_selftest",
				 X86_FEATURE_ALWAYS)
		     : : [mem] "m" (__alt_reloc_selftest_addr)
		     : ALT_CALL_CLOBBERS);
	return READ_ONCE(alt_reloc_selftest_result);
}
