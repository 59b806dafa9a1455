"""The one exception type for mistakes a user can make and fix."""


class UserError(Exception):
    """A mistake the user can fix: the CLI prints its message as one line and exits with code 2."""
