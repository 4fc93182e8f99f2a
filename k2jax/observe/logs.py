"""Library logging stays out of the way of k2jax's own progress lines.

Orbax and JAX log through absl / Python logging at INFO (hundreds of lines for a 10-step run);
every command sets them to WARNING unless asked for: `K2JAX_LOG_LEVEL=INFO` (or DEBUG) brings
them back, and `python -m k2jax.train --verbosity=0` does too.
"""

import logging
import os

from absl import logging as absl_logging

ENV = 'K2JAX_LOG_LEVEL'
LEVELS = ('DEBUG', 'INFO', 'WARNING', 'ERROR')


def quiet_libraries(explicit: bool = False) -> str:
  """Sets library logging to $K2JAX_LOG_LEVEL (default WARNING); returns the level. With
  explicit=True (the user set absl's --verbosity) absl's own setting is left as given."""
  level = os.environ.get(ENV, 'WARNING').upper()
  if level not in LEVELS:
    raise ValueError(f'{ENV}={level!r} is not one of {", ".join(LEVELS)}')
  if not explicit:
    absl_logging.set_verbosity(level.lower())
  logging.getLogger().setLevel(level)
  for name in ('jax', 'orbax', 'absl'):
    logging.getLogger(name).setLevel(level)
  return level
