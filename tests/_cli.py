"""Running the segq CLI in-process (click's CliRunner) for the CLI tests."""

from __future__ import annotations

from click.testing import CliRunner, Result

from segq.cli import cli

__all__ = ["run", "ok", "fails"]


def run(*args: object, input: bytes | str | None = None) -> Result:
    """Invoke segq; check the promise that holds for every outcome: no traceback, ever."""
    result = CliRunner().invoke(cli, [str(arg) for arg in args], input=input)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


def ok(*args: object, input: bytes | str | None = None) -> Result:
    """Invoke segq; it must succeed."""
    result = run(*args, input=input)
    assert result.exit_code == 0, result.output
    return result


def fails(*args: object, input: bytes | str | None = None, code: int = 1) -> str:
    """Run a command that must fail with ``code``; return its last stderr line (the one error line for code 1)."""
    result = run(*args, input=input)
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[-1]
