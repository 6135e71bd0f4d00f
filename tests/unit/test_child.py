"""The tests' child-process helper keeps a child's outcome that arrives together with its progress line."""

from __future__ import annotations

from tests.child import PythonChild

TWO_LINES_AT_ONCE = 'import os; os.write(1, b"open\\n" + b\'{"n": 1}\\n\')'


def test_an_outcome_written_with_the_progress_line_is_not_lost() -> None:
    child = PythonChild(TWO_LINES_AT_ONCE)
    child.expect("open\n")
    assert child.outcome(timeout=30) == {"n": 1}
