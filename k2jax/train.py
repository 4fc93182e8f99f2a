"""`python -m k2jax.train --config=configs/<stage>.py[:args] --workdir=DIR [--config.key=value ...]`

One loop for every stage (k2jax/training/loop.py): the config decides model, mesh, data,
schedule. This module is the command line: flags, multi-host start-up (k2jax/training/cluster.py),
the persistent compilation cache (k2jax/training/compile_cache.py), and user errors as one line on
stderr with exit status 2. The run itself is k2jax/training/run.py (`prepare`, `run`).
"""

from absl import app, flags
from ml_collections import config_flags

from k2jax import errors, run_config
from k2jax.observe import logs
from k2jax.training import compile_cache
from k2jax.training.run import prepare, run, start_distributed

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Stage config file[:args].')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for metrics and checkpoints.')
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address',
  None,
  'host:port of process 0, for a multi-host run started by hand (with --num_processes and '
  '--process_id); under SLURM or Kubernetes use --distributed instead',
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process: 0..num_processes-1.')
_DISTRIBUTED = flags.DEFINE_bool(
  'distributed',
  False,
  "Initialize jax.distributed from the cluster's environment (K2JAX_COORDINATOR / "
  'K2JAX_NUM_PROCESSES / K2JAX_PROCESS_ID, SLURM, a Kubernetes Indexed Job, Open MPI), as on '
  'every host of a multi-host job (launch/, docs/multihost.md).',
)


def main(argv):
  if len(argv) > 1:
    errors.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if _CONFIG.value is None or _WORKDIR.value is None:
    errors.fail('both --config=configs/<stage>.py[:args] and --workdir=DIR are required')
  with errors.one_line_errors():
    # Orbax's INFO lines would bury the progress lines; absl's --verbosity brings them back.
    logs.quiet_libraries(explicit=flags.FLAGS['verbosity'].present)
    layout = start_distributed(
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED.value
    )
    if layout:
      print(f'k2jax: jax.distributed: {layout}', flush=True)  # every host: in its own log
    # Before the first compilation: a restart reads the compiled train step back.
    cache_dir = compile_cache.enable(_CONFIG.value.get('compile_cache_dir', 'auto'), _WORKDIR.value)
    prepared = prepare(_CONFIG.value, _WORKDIR.value)
  try:
    run(prepared)
  finally:
    print(f'k2jax: {compile_cache.stats().describe(cache_dir)}', flush=True)


def parse_flags(argv):
  """absl's flag parsing with one-line errors (exit 2) for a bad config or override."""
  return run_config.parse_flags(flags.FLAGS, argv)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
