"""The one exception type a user can cause, and the wrapper that turns it into one line and exit 2.

Every CLI (`data_prep`, `pipeline.pretrain`/`finetune`/`evaluate`/`export`/`demo`, `launch.plan`,
`launch.config_check`) runs its `main` through `cli_main`, so user mistakes look alike everywhere:

    error: <what is wrong, naming the file, key or value, and what to do>

on standard error, exit status 2, no traceback. Anything else is a bug and keeps its traceback.
It also sets the umask everything is written under (core.files.apply_umask: 077 unless $COATNET_UMASK).
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable, Optional, Sequence

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """Bad input from the user (missing folder, bad option or key, bad manifest row, refused OUT).

    The message must name the file/option/value and say what to do; it is printed without a traceback.
    """


def _printing_rank() -> bool:
    """Under a multi-rank launcher only rank 0 prints a user error (every rank raises the same one)."""
    return os.environ.get("RANK", "0") in ("", "0")


def report_user_error(err: BaseException) -> int:
    """Print `err` as the one-line user error and return the exit status for it."""
    if _printing_rank():
        message = " ".join(str(err).split("\n"))
        print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def cli_main(main: Callable[..., Optional[int]]) -> Callable[..., int]:
    """Decorate a CLI's `main(argv=None) -> int | None`: user errors -> one line + exit 2, Ctrl-C -> 130.

        @cli_main
        def main(argv=None): ...
        if __name__ == "__main__":
            sys.exit(main())
    """
    @functools.wraps(main)
    def wrapped(argv: Optional[Sequence[str]] = None, *args, **kwargs) -> int:
        try:
            from core.files import apply_umask

            try:
                apply_umask()  # before anything is written: private files by default
            except ValueError as err:
                raise UserError(str(err)) from None
            code = main(argv, *args, **kwargs)
        except UserError as err:
            return report_user_error(err)
        except KeyboardInterrupt:
            if _printing_rank():
                print("interrupted: re-run the same command to resume", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        return 0 if code is None else int(code)

    return wrapped
