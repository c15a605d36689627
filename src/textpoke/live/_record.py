# SPDX-License-Identifier: GPL-2.0-only
"""The slotted records live writes out by hand instead of using
dataclasses (whose machinery cost a millisecond of every command's start):
what each repeated -- equality by a key, a repr of the fields, and for the
immutable ones no assignment and a hash -- written once.  A record lists
its fields in ``__slots__`` and assigns them in its own ``__init__``."""

from __future__ import annotations

__all__ = ["Record", "FrozenRecord"]


class Record:
    """Compared by :meth:`_key` (every field, unless a record says
    otherwise), between records of the same class only; not hashable."""

    __slots__ = ()

    def _key(self) -> tuple:
        return tuple(getattr(self, k) for k in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._key() == other._key()         # type: ignore[attr-defined]

    __hash__ = None                                # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}("
                + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")")


class FrozenRecord(Record):
    """A :class:`Record` that cannot change once made (its ``__init__``
    sets the fields with ``object.__setattr__``), hashed by its key, copied
    and pickled by calling the class with every field again."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: a {type(self).__name__} "
                             "is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}: a {type(self).__name__} "
                             "is immutable")

    def __hash__(self) -> int:
        return hash(self._key())

    def __reduce__(self):                      # copy and pickle: rebuilt, not assigned
        return (type(self), tuple(getattr(self, k) for k in self.__slots__))
