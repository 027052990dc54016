"""Every command's --help reads cleanly at 80 columns: no line wider than the
terminal, no value type shown for flags (`--help <bool>`), and paragraphs reflowed
to the width instead of keeping the docstrings' own line breaks."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from edged.cli import app


def _commands() -> list[tuple[str, ...]]:
    root = typer.main.get_command(app)
    found: list[tuple[str, ...]] = [()]

    def walk(group, path: tuple[str, ...]) -> None:
        for name, command in sorted(group.commands.items()):
            found.append((*path, name))
            if hasattr(command, "commands"):  # a group (typer vendors its own click)
                walk(command, (*path, name))

    walk(root, ())
    return found


@pytest.mark.parametrize("words", _commands(), ids=lambda words: " ".join(words) or "edged")
def test_help_at_80_columns(words):
    result = CliRunner().invoke(app, [*words, "--help"], env={"COLUMNS": "80", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80, [line for line in lines if len(line) > 80]
    assert "<bool>" not in result.output
    assert "--help" in result.output and "Show this message and exit." in result.output


def test_summaries_are_reflowed_not_cut_at_source_line_breaks():
    text = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "80", "TERM": "dumb"}).output
    assert "config (never overwritten)" in " ".join(line.strip(" │") for line in text.splitlines())
    for line in text.splitlines():
        assert line.strip(" │") != "(never", text
