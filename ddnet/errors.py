"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class UserError(ValueError):
    """Bad input or an impossible request. The message names the problem and the fix, in one line."""
