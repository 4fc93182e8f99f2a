"""`python -m launch.finished WORKDIR`: exit 0 if the run in WORKDIR has finished its stage, else 1.

A run stopped by SIGTERM (preemption, or SLURM's `--signal` before the time limit) saves and
exits 0 like a finished one; the SLURM script asks this to tell them apart and requeues the
job only when steps are left. Finished means: the newest committed checkpoint is at the
`total_steps` of the config saved with it.
"""

import sys


def progress(workdir: str) -> tuple[int, int | None]:
  """(newest committed step or 0, its total_steps or None)."""
  from k2jax.training import checkpoint

  ckpt_dir = checkpoint.directory(workdir)
  steps = checkpoint.committed_steps(ckpt_dir)
  if not steps:
    return 0, None
  step, saved = checkpoint.saved_run_config(ckpt_dir, steps)
  return step, (saved or {}).get('total_steps')


def main(argv) -> int:
  if len(argv) != 1:
    print('usage: python -m launch.finished WORKDIR', file=sys.stderr)
    return 2
  step, total = progress(argv[0])
  if total is not None and step >= total:
    print(f'{argv[0]}: finished, step {step} of {total}')
    return 0
  print(f'{argv[0]}: not finished, newest checkpoint at step {step} of {total or "?"}')
  return 1


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
