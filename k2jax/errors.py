"""User errors: the one set every command turns into a one-line message and exit status 2.

Library code raises ordinary exceptions (a `ValueError` for bad input, `FileNotFoundError` for
a missing path, ...) whose text names the file, key or dimension at fault; the commands catch
`USER_ERRORS` around their work with `one_line_errors()`, and parse their flags with
`ArgumentParser`, whose errors read the same. Anything else is a bug and keeps its traceback.
"""

import argparse
import contextlib
import sys
from typing import NoReturn

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, NotImplementedError, KeyError)


def message(error: BaseException) -> str:
  """The one-line text of a user error (str of a KeyError is its repr, quotes and all)."""
  if isinstance(error, KeyError) and error.args:
    return str(error.args[0])
  return str(error)


def fail(text: str) -> NoReturn:
  """Prints `error: <text>` on stderr (no traceback) and exits with status 2, like a bad flag."""
  print(f'error: {text}', file=sys.stderr)
  sys.exit(2)


@contextlib.contextmanager
def one_line_errors():
  """Turns a user error raised inside the block into `fail(message(error))`."""
  try:
    yield
  except USER_ERRORS as error:
    fail(message(error))


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors (and its subcommands') are one line and exit 2, like every k2jax
  command's."""

  def error(self, message):
    fail(message)
