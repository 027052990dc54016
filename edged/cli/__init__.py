"""The ``edged`` command line: one module per command group.

The commands only parse options, call into ``edged`` or ``converters`` and
print. ``entry`` is the program (``edged = edged.cli:entry``, ``python -m
edged.cli``): a plain ``edged serve`` starts the daemon without loading typer
(see ``edged.cli.serve``), every other command line goes to ``main.app``, the
typer application. ``edged.cli.app`` is that application, imported on first use.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["app", "entry"]


def entry() -> None:
    """Run the ``edged`` command line given in ``sys.argv``."""
    from edged.cli.serve import plain_serve_args, run_serve

    args = plain_serve_args(sys.argv[1:])
    if args is not None:
        sys.exit(run_serve(args.config))
    from edged.cli.main import app

    app()


def __getattr__(name: str) -> Any:
    """``edged.cli.app``, imported when first asked for (PEP 562)."""
    if name == "app":
        from edged.cli.main import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
