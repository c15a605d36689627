# SPDX-License-Identifier: GPL-2.0-only
"""``python -m textpoke`` runs the command line."""

try:
    from textpoke.cli import main
except KeyboardInterrupt:
    # Ctrl-C while the package itself was being imported, before the
    # command line's handlers exist: nothing was touched.  Said the way
    # every interrupted command says it (exit 130, JSON under --json).
    import json
    import sys
    if "--json" in sys.argv[1:]:
        print(json.dumps({"command": next((a for a in sys.argv[1:] if not a.startswith("-")),
                                          None),
                          "interrupted": True, "int3_left": None,
                          "int3_left_reason": "interrupted before the command started"}))
    print("textpoke: interrupted before any work was done", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
