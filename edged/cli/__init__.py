"""The ``edged`` command line: one module per command group.

The commands only parse options, call into ``edged`` or ``converters`` and
print; ``main.app`` is the entry point (``edged = edged.cli:app``).
"""

from edged.cli.main import app

__all__ = ["app"]
