"""One error type for everything a user can fix, so every stage reports it as one line and exits 2."""


class UserError(Exception):
    """A problem in params, inputs or artifacts that the user can fix; its message is the whole report."""


EXIT_USER_ERROR = 2
