"""edged: an edge inference runtime and daemon."""

__version__ = "0.1.0"
