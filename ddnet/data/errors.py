"""The data layer's error type (its own module so readers and the generator can raise it)."""

from ddnet.errors import UserError


class DataError(UserError):
    """Unreadable, missing or inconsistent data; one line naming the file or folder and the fix."""
