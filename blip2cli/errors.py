"""The one exception type users see: its message is printed as a single line, without a traceback."""


class Blip2Error(Exception):
    """Bad input or an unavailable resource, explained in one line."""
