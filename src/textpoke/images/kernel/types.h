/* SPDX-License-Identifier: GPL-2.0-only
 * Freestanding basics for the image's C files. */
#ifndef _TEXTPOKE_TYPES_H
#define _TEXTPOKE_TYPES_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef signed int s32;
typedef _Bool bool;
#define true 1
#define false 0
#define NULL ((void *)0)

#define __always_inline	inline __attribute__((__always_inline__))
#define noinline	__attribute__((__noinline__))
#define __used		__attribute__((__used__))
#define notrace		__attribute__((__no_instrument_function__))

#define READ_ONCE(x)	(*(const volatile typeof(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile typeof(x) *)&(x) = (v))

#endif
