"""data_prep's own error: an input that changed under a running job. User errors are core.errors.UserError."""
from core.errors import UserError

__all__ = ["InputChanged", "UserError"]


class InputChanged(UserError):
    """A source file differs from what the scan saw (edited, deleted, unreadable now): stop, never guess.

    Raised inside Ray tasks; the driver turns it back into a one-line error. Re-running resumes.
    """
