# SPDX-License-Identifier: GPL-2.0-only
"""The jump-label client: ``jump_label_init`` over ``__jump_table`` and the
code of a site for a key state; run-time updates build on it."""

from ._boot import jump_label_code, jump_label_init, jump_label_sync

__all__ = ["jump_label_init", "jump_label_sync", "jump_label_code"]

# run-time static keys (textpoke._jump_label._keys)
from ._keys import (JumpLabelError, StaticKey, StaticKeyError, StaticKeys,  # noqa: E402
                    StaticKeyWarning, UnknownKeyError)

__all__ += ["StaticKeys", "StaticKey", "JumpLabelError", "StaticKeyError", "StaticKeyWarning",
            "UnknownKeyError"]
