"""`python -m launch.layout`: the process layout this environment gives `python -m k2jax.train
--distributed` (k2jax/training/cluster.py), without starting anything; exit 2 if it is wrong."""

import os
import sys

from k2jax.training import cluster


def main() -> int:
  try:
    layout = cluster.detect(os.environ)
  except ValueError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  if layout is None:
    print('layout: no K2JAX_*, SLURM or Kubernetes variables: JAX detects the cluster itself')
  else:
    print(f'layout: {layout.describe()}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
