"""Errors meant for people: the CLI prints them as one line and exits 2."""


class UserError(Exception):
    """Bad input from the user: a bad config, a missing file, a bad URI,
    unreachable storage. The message names what is wrong and never carries
    credentials."""
