# SPDX-License-Identifier: GPL-2.0-only
"""The scheduler's random generator: ``random.Random`` that counts the
words it drew and can go back to any earlier count (fast-forward rolls a
run of decisions back with it), and the draws the hot loops make without
the Python layers."""

from __future__ import annotations

import _random
import random
from typing import Any

__all__ = ["CountingRandom"]

# The C generator's own methods: the scheduler's hot loops draw through
# them and count the words themselves (CountingRandom's overrides count
# for everyone else).
_c_random = _random.Random.random
_c_getrandbits = _random.Random.getrandbits


def _below(rng: "CountingRandom", n: int) -> int:
    """``rng._randbelow(n)``: the same draws, without the Python layers."""
    k = n.bit_length()
    r = _c_getrandbits(rng, k)
    w = 1
    while r >= n:
        r = _c_getrandbits(rng, k)
        w += 1
    rng.words += w
    return r


class CountingRandom(random.Random):
    """``random.Random`` that counts the 32-bit words of the Mersenne
    Twister it has used, and can go back to any earlier count (the
    scheduler rolls a fast-forward back with it).  Every draw is the one
    ``random.Random(seed)`` makes: ``random()`` takes two words,
    ``getrandbits(k)`` ceil(k/32), and everything else goes through those
    two (``_randbelow`` is the getrandbits one, as in the base class)."""

    def __init__(self, x: Any = None) -> None:
        self.words = 0
        self._shadow: tuple[random.Random, int] | None = None
        super().__init__(x)

    def seed(self, a: Any = None, version: int = 2) -> None:
        super().seed(a, version)
        self.words = 0
        # Only an int seed can be replayed from scratch.
        self._seed0 = a if isinstance(a, int) else None
        self._shadow = None

    def random(self) -> float:
        self.words += 2
        return _c_random(self)

    def getrandbits(self, k: int) -> int:
        self.words += (k + 31) >> 5
        return _c_getrandbits(self, k)

    def setstate(self, state: Any) -> None:
        super().setstate(state)
        self._seed0 = None       # where it is now no longer follows from the seed

    def rewind(self, words: int) -> bool:
        """Back to the state after *words* words (<= ``self.words``); False
        (and nothing changed) when that cannot be done."""
        if self._seed0 is None or not 0 <= words <= self.words:
            return False
        sh = self._shadow
        if sh is None or sh[1] > words:
            sh = (random.Random(self._seed0), 0)
        gen, at = sh
        while at < words:                 # a word per 32 bits, in big steps
            m = min(words - at, 4096)
            _c_getrandbits(gen, 32 * m)
            at += m
        self._shadow = (gen, at)
        seed0 = self._seed0
        random.Random.setstate(self, gen.getstate())
        self._seed0 = seed0
        self.words = words
        return True
