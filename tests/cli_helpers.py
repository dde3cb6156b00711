"""Running the ``bitalloc`` CLI inside the test process, and checking its one-line errors."""

from __future__ import annotations

import pytest

from allocator.cli import main


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process: (exit code, stdout, stderr)."""
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse errors
        code = int(exc.code)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, message: str) -> None:
    """Bad input: exit code 2 and exactly one line on stderr, no traceback."""
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("bitalloc: error: ") and message in err, err
    assert "Traceback" not in err
