"""`data_pipeline.prepare --engine=ray`: the same per-file shards as Ray tasks.

Each unfinished input file is one task running `prepare.prepare_shard`, exactly the local
engine's work, so the shards, their counts files and the manifest are byte-identical to the
local engine's, whichever node wrote them. Resuming, the request checks and the manifest stay
in prepare.py: a rerun skips finished shards as before.

  local Ray   (the default) started here with `--workers` CPUs and stopped at the end
  a cluster   `--ray_address=ray://head:10001` or `auto` (a SLURM allocation running
              `ray start`, a KubeRay cluster): every node must have k2jax installed and see
              the input files, the tokenizer and `--output` at the same paths (a shared
              filesystem); at most `--workers` tasks are in flight

A task that fails on a lost worker or node, or on an I/O error, is retried (`--retries`); a
bad input (ValueError: a file without usable records) fails the run at once, as locally.
Ray is an optional extra (`pip install k2jax[ray]`), imported only here.
"""

import importlib.util
import logging
import os

from data_pipeline import prepare

# Failures worth another try: a node or worker lost (Ray retries those itself) and I/O.
_RETRIED = (OSError, TimeoutError)


_MISSING = "--engine=ray needs Ray: pip install 'k2jax[ray]' (or pip install ray)"


def check_installed() -> None:
  """A clear ValueError when Ray is not installed (without importing it: that takes seconds)."""
  if importlib.util.find_spec('ray') is None:
    raise ValueError(_MISSING)


def _ray():
  try:
    import ray
  except ImportError:
    raise ValueError(_MISSING) from None
  return ray


def prepare_shards(
  request: prepare.Request,
  output: str,
  todo: list[int],
  workers: int,
  address: str,
  retries: int,
  on_done,
) -> None:
  """Runs `prepare_shard` for every index in `todo` as Ray tasks; `on_done(index, counts)`
  as each one finishes."""
  ray = _ray()
  os.environ.setdefault('RAY_USAGE_STATS_ENABLED', '0')  # no reporting home from a data job
  started_here = not ray.is_initialized()
  if started_here:
    if address:
      ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    else:
      ray.init(
        num_cpus=workers,
        include_dashboard=False,
        logging_level=logging.WARNING,
        object_store_memory=100 * 2**20,  # tasks return only small counts
      )
  workers = workers or int(ray.cluster_resources().get('CPU', 1))
  task = ray.remote(num_cpus=1, max_retries=retries, retry_exceptions=list(_RETRIED))(
    prepare.prepare_shard
  )
  queue = list(todo)
  running = {}  # object ref -> shard index
  try:
    while queue or running:
      while queue and len(running) < workers:
        index = queue.pop(0)
        running[task.remote(request, output, index)] = index
      ready, _ = ray.wait(list(running), num_returns=1)
      for ref in ready:
        index = running.pop(ref)
        try:
          counts = ray.get(ref)
        except ray.exceptions.RayTaskError as error:
          cause = getattr(error, 'cause', None)
          if isinstance(cause, (ValueError, FileNotFoundError)):
            raise cause from None  # the message names the file, as the local engine's does
          raise
        on_done(index, counts)
  finally:
    for ref in running:
      ray.cancel(ref, force=True)
    if started_here:
      ray.shutdown()
