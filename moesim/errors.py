"""User-facing errors.

Anything a user can cause (a bad file, flag or field) raises :class:`MoesimError` with a one-line
message that names the thing and what was expected. The CLI prints it without a traceback and exits
with status 2; library callers can catch it like any exception.
"""


class MoesimError(Exception):
    """A user mistake or an unusable input, reported as one line."""

    exit_code = 2

    def __init__(self, message: str):
        # A value the user typed may hold a line break; shown escaped, the message stays one line.
        message = message.replace("\r", "\\r").replace("\n", "\\n")
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
