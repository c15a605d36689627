# SPDX-License-Identifier: GPL-2.0-only
"""The static-call client: boot-time initialisation of inline static-call
sites (``static_call_init``); run-time updates build on it."""

from ._boot import sc_transform, static_call_init, static_call_sync

__all__ = ["static_call_init", "static_call_sync", "sc_transform"]

# run-time static calls (textpoke._static_call._calls)
from ._calls import StaticCall, StaticCallError, StaticCalls, UnknownCallError  # noqa: E402

__all__ += ["StaticCalls", "StaticCall", "StaticCallError", "UnknownCallError"]
