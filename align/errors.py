"""One error type for everything a user can fix, so every stage reports it as one line and exits 2."""


class UserError(Exception):
    """A problem in params, inputs or artifacts that the user can fix; its message is the whole report."""


EXIT_USER_ERROR = 2


def first_line(exc: BaseException, width: int | None = None) -> str:
    """`Type: the first line of its message` (cut to `width` characters): a library's error as one line's cause."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:width]}"
