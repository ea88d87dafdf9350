"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """A mistake in something the user gave (config, data, path, flag), naming what and where."""


def renamed(err: UserError, key: str, default: str = "data.path") -> UserError:
    """`err` with its leading key `default` replaced by `key`: a stage that reads data through
    the loader (whose errors name data.path) under a key of its own, e.g. sample.input."""
    text = str(err)
    prefix = f"{default}: "
    return UserError(f"{key}: {text[len(prefix):]}") if text.startswith(prefix) else err
