"""Error types that decide the command line's exit code.

`BadInput` is the user's fault (exit 2); anything else escaping a command is ours (exit 1).
"""

from __future__ import annotations


class BadInput(Exception):
    """Input the user can fix. The message names the file, row or field and what is wrong.

    `problems` carries every problem found, so a validator can report all of them at once.
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        super().__init__(message)

    def __str__(self) -> str:
        head = super().__str__()
        if not self.problems:
            return head
        return head + "\n" + "\n".join(f"  - {p}" for p in self.problems)
