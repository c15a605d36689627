# SPDX-License-Identifier: GPL-2.0-only
"""The machine-agnostic core: the machine protocol, text_poke*, the SMP
batch and its INT3 handler, decoding, emulation and the event log.

Nothing under this package imports Unicorn or ptrace code; the machines
(:mod:`textpoke.sim`, :mod:`textpoke.live`) implement the protocol in
:mod:`._machine`.
"""

from ._textpoke import TextPoke
from ._types import (MUTATIONS, TEXT_POKE_ARRAY_MAX, SmpTextPokeLoc, TextMutex, TextPokeArray,
                     TextPokeStats)

__all__ = ["MUTATIONS", "TEXT_POKE_ARRAY_MAX", "SmpTextPokeLoc", "TextMutex", "TextPoke",
           "TextPokeArray", "TextPokeStats"]
