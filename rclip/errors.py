"""One exception type for every user-facing mistake: it names the problem and the fix."""


class RClipError(ValueError):
    """Bad input or a missing resource. The message says what is wrong and how to fix it."""
