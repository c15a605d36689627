/* SPDX-License-Identifier: GPL-2.0-only
 *
 * CPU feature numbers (word * 32 + bit) used by the image's alternative
 * sites.  The numbering follows the kernel's cpufeatures.h; only the
 * features the image mentions are listed.  textpoke.images._tables keeps
 * the same names and numbers (X86_FEATURES) and a test checks that the two
 * agree.
 */
#ifndef _TEXTPOKE_CPUFEATURES_H
#define _TEXTPOKE_CPUFEATURES_H

#define X86_FEATURE_XMM2		( 0*32+26)
#define X86_FEATURE_RDTSCP		( 1*32+27)
#define X86_FEATURE_UP			( 3*32+ 9)
#define X86_FEATURE_LFENCE_RDTSC	( 3*32+18)
#define X86_FEATURE_ALWAYS		( 3*32+21)
#define X86_FEATURE_POPCNT		( 4*32+23)
#define X86_FEATURE_HYPERVISOR		( 4*32+31)
#define X86_FEATURE_RETPOLINE		( 7*32+12)
#define X86_FEATURE_RETPOLINE_LFENCE	( 7*32+13)
#define X86_FEATURE_XENPV		( 8*32+16)
#define X86_FEATURE_AVX2		( 9*32+ 5)
#define X86_FEATURE_BMI2		( 9*32+ 8)
#define X86_FEATURE_ERMS		( 9*32+ 9)
#define X86_FEATURE_SMAP		( 9*32+20)
#define X86_FEATURE_CLFLUSHOPT		( 9*32+23)
#define X86_FEATURE_RETHUNK		(11*32+14)
#define X86_FEATURE_FSRM		(18*32+ 4)

#endif
