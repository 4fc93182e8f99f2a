"""What the command lines over a checkpoint (generate, evaluate, lm_eval_adapter) share."""

import argparse

from k2jax import errors


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors are one line and exit 2, like the other k2jax commands."""

  def error(self, message):
    errors.fail(message)
