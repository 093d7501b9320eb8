"""The entry-point wrapper of every command-line script: user errors as one line, not a traceback."""

from __future__ import annotations

import sys
from typing import Any, Callable, NoReturn

USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130


def is_user_error(error: BaseException) -> bool:
    """Return whether ``error`` is one of this project's input errors (a ``ValueError`` subclass defined in ``coala``).

    Those carry a message that names the bad value and the fix. Any other
    exception is a bug and keeps its traceback.
    """
    module = type(error).__module__
    # A module run with ``python -m coala.x`` defines its classes under ``__main__``.
    return isinstance(error, ValueError) and (module.startswith("coala.") or module == "__main__")


def run_cli(main: Callable[[], Any], interrupted_hint: str = "") -> NoReturn:
    """Call ``main()`` and exit: 0 on success, 2 with ``error: MESSAGE`` on a user error, 130 on Ctrl-C."""
    try:
        main()
    except KeyboardInterrupt:
        print(f"\ninterrupted. {interrupted_hint}".rstrip(), file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT)
    except ValueError as error:
        if not is_user_error(error):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    sys.exit(0)
