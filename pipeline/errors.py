"""The kinds of failure every entry point tells apart (pipeline/cli.py acts on them).

    UserError   something the user can fix: a config key, a path, credentials, bad data,
                a checkpoint of another run. One line that says what to do; exit 2.
    RunError    the run itself stopped in a way it explains in one line (a full disk
                during a checkpoint, a NaN loss); exit 1, no traceback.
    anything else is a bug in this code: its traceback is kept; exit 1.
Every module raises the most specific subclass it has (ConfigError, StorageError, ...);
nothing catches broad built-in exceptions to turn them into user errors.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; str(err) is one line naming what and how."""


class RunError(Exception):
    """The run stopped for a reason its one-line message gives (not a user mistake)."""


class ConfigError(UserError, ValueError):
    """A config mistake; the message is one line and names the key."""


class DataError(UserError, ValueError):
    """Shards or images that cannot be used as given (missing, empty, too few, refused)."""


class CheckpointMismatch(UserError, ValueError):
    """A checkpoint or weights file that is not this run's or not this project's."""
