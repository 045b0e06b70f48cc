"""Log filtering shared by the entry points."""

import logging as std_logging

from absl import logging


def _not_orbax_info(record) -> bool:
  # record.levelno is a Python level: absl's logging.WARNING is 1, not 30.
  return "orbax" not in record.pathname or record.levelno >= std_logging.WARNING


def quiet_orbax() -> None:
  """Orbax logs every file operation at INFO; keep its warnings and errors.
  Call in main(), once absl has installed its handler."""
  logging.get_absl_handler().addFilter(_not_orbax_info)
