"""User errors: what a person can fix by changing a flag, a config key, a
path or a file. Entry points print them as one line and exit with code 2;
anything else (a bug in rtjax, jax or a library) keeps its traceback.

Each message names the offending thing and what to do about it.

A RunError is not the user's mistake but a run that could not finish for a
reason outside rtjax (a full disk, training that diverged): entry points print
it as one line too, and exit with code 1.
"""


class UserError(Exception):
  """Base of every error a user can fix; never raised for rtjax's own bugs."""


class ConfigError(UserError):
  """A config key is unknown or its value out of range; names the key."""


class CheckpointError(UserError):
  """A path is not a usable checkpoint; says which and why."""


class DataError(UserError):
  """A dataset is missing or a data file is unreadable; names the file."""


class FlagError(UserError):
  """A command-line flag value is invalid; names the flag."""


class InputError(UserError):
  """Inputs given to a served model do not fit it (shape, dtype)."""


class LaunchError(UserError):
  """A launch argument is wrong or a remote command failed."""


class RunError(Exception):
  """A run stopped for a reason outside rtjax that the message explains
  (what failed, what was kept, how to go on); exit code 1."""
