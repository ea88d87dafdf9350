"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """A mistake in something the user gave (config, data, path, flag), naming what and where."""
