# SPDX-License-Identifier: GPL-2.0-only
"""A loaded module: where its sections and symbols are, what it registered."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._link import UnknownSymbolError

__all__ = ["Module"]


@dataclass(eq=False)
class Module:
    """A loaded module: where its sections and symbols are, what it registered."""

    name: str
    text: int                       # base of module text
    text_size: int
    data: int
    data_size: int
    sections: dict[str, int]        # allocated section -> address
    symbols: dict[str, int]         # defined symbols -> address
    sizes: dict[str, int]
    jump_entries: int = 0
    static_call_sites: int = 0
    #: static keys the module defines itself (addresses in its data)
    own_keys: list[int] = field(default_factory=list)
    #: static calls the module defines itself (keys in its data)
    own_calls: list = field(default_factory=list)
    finalize: dict[str, int] = field(default_factory=dict)   # patched sites per table
    patched: list[tuple[int, bytes]] = field(default_factory=list)  # (site, bytes) finalize wrote
    live: bool = True
    #: ITS thunk pages of the module's own (its_init_mod): page -> thunks (addr, reg)
    its_pages: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    _text_alloc: int = 0
    _data_alloc: int = 0
    _its_allocs: list[int] = field(default_factory=list)

    def sym(self, name: str) -> int:
        try:
            return self.symbols[name]
        except KeyError:
            raise UnknownSymbolError(f"module {self.name} has no symbol {name!r}") from None

    def as_dict(self) -> dict:
        return {"name": self.name, "text": self.text, "text_size": self.text_size,
                "data": self.data, "data_size": self.data_size, "jump_entries": self.jump_entries,
                "static_call_sites": self.static_call_sites, "finalize": dict(self.finalize),
                "live": self.live}

