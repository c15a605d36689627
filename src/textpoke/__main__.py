# SPDX-License-Identifier: GPL-2.0-only
"""``python -m textpoke`` runs the command line."""

from textpoke.cli import main

raise SystemExit(main())
