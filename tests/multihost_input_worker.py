"""One of several processes on localhost: trains a few steps of the small config on each mesh of
tests/test_multihost_input.py, one after the other (one start-up for all of them).

    python tests/multihost_input_worker.py PORT PROCESS_ID NUM_PROCESSES OUT_DIR

Writes OUT_DIR/<mesh>/process<i>.json: this process's input shard, which mesh axes span
processes, and (process 0) the losses of the run's metrics records.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def spanning_axes(mesh) -> list[str]:
  """The mesh axes along which one group (the other axes fixed) holds devices of >1 process."""
  import numpy as np

  processes = np.vectorize(lambda d: d.process_index)(mesh.devices)
  spans = []
  for axis, name in enumerate(mesh.axis_names):
    groups = np.moveaxis(processes, axis, -1).reshape(-1, processes.shape[axis])
    if any(len(set(group)) > 1 for group in groups):
      spans.append(name)
  return spans


def main(port: str, process_id: str, num_processes: str, out_dir: str):
  import jax

  from tests.helpers import join_local_cluster

  join_local_cluster(port, process_id, num_processes)
  from k2jax.training.run import prepare, run
  from tests.helpers import read_metrics
  from tests.test_multihost_input import MESHES, mesh_config

  for name in MESHES:
    workdir = os.path.join(out_dir, name)
    prepared = prepare(mesh_config(name), workdir)
    shard = prepared['shard']
    run(prepared)
    result = dict(
      shard=[shard.index, shard.count, shard.rows],
      spans=spanning_axes(prepared['plan'].mesh),
      local_devices=len(jax.local_devices()),
    )
    if jax.process_index() == 0:
      result['losses'] = [r['loss'] for r in read_metrics(workdir) if 'loss' in r]
    with open(os.path.join(workdir, f'process{jax.process_index()}.json'), 'w') as f:
      json.dump(result, f)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main(*sys.argv[1:])
