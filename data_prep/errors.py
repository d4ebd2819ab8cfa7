"""The one exception type a user can cause: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (missing folder, bad option, bad manifest row, refused OUT).

    The message must name the file/option/value and say what to do; no traceback is shown.
    """


class InputChanged(UserError):
    """A source file differs from what the scan saw (edited, deleted, unreadable now): stop, never guess.

    Raised inside Ray tasks; the driver turns it back into a one-line error. Re-running resumes.
    """
