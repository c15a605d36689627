# SPDX-License-Identifier: GPL-2.0-only
"""Typed errors.  Where the kernel would BUG(), textpoke refuses and leaves
the text exactly as it was."""

__all__ = [
    "TextPokeError",
    "BadInstructionError",
    "BadAddressError",
    "OverlapError",
    "TextMutexError",
    "VerifyMismatchError",
    "MachineError",
    "MachineClosedError",
    "NotSupportedError",
]


class TextPokeError(Exception):
    """Base class of every error textpoke raises on purpose."""


class BadInstructionError(TextPokeError, ValueError):
    """The bytes, length or emulation instruction break a batch rule."""


class BadAddressError(TextPokeError, ValueError):
    """The address range is not (wholly) in mapped kernel text, or spans
    more pages than one poke may map."""


class OverlapError(TextPokeError, ValueError):
    """Two entries of one batch would patch overlapping bytes."""


class TextMutexError(TextPokeError, RuntimeError):
    """An operation that needs ``text_mutex`` ran without holding it."""


class VerifyMismatchError(TextPokeError, RuntimeError):
    """Read-back after a poke did not return the bytes written."""


class MachineError(TextPokeError, RuntimeError):
    """The machine could not do what the core asked (a CPU is gone, a
    task never finished, ...)."""


class MachineClosedError(MachineError):
    """The machine (or the TextPoke on it) was closed."""


class NotSupportedError(MachineError):
    """The machine does not offer an optional capability (see
    :class:`textpoke.Capability`)."""
