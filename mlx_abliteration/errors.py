"""Errors caused by user input. The CLI prints them as one line, no traceback."""


class UserError(Exception):
    """A problem the user can fix (bad path, bad flag value, bad dataset...).

    The message must name the problem and the fix.
    """
