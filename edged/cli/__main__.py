"""``python -m edged.cli``."""

from edged.cli import entry

entry()
