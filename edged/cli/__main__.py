"""``python -m edged.cli``."""

from edged.cli.main import app

app()
