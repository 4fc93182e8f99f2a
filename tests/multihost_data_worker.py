"""One of several processes on localhost: builds its data shard and the global batch.

    python tests/multihost_data_worker.py PORT PROCESS_ID NUM_PROCESSES OUT_DIR

Run by tests/test_multihost_data.py with 4 simulated CPU devices per process.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from tests.helpers import join_local_cluster  # noqa: E402


def main(port: str, process_id: str, num_processes: str, out_dir: str):
  join_local_cluster(port, process_id, num_processes)
  from data_pipeline import pipeline
  from k2jax.parallel import input as batch_input
  from k2jax.parallel import sharding

  demo = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data_pipeline', 'demo'
  )
  data_cfg = ml_collections.ConfigDict(
    dict(
      seq_len=64,
      global_batch_size=8,
      train_files=os.path.join(demo, 'eval.jsonl'),
      tokenizer=os.path.join(demo, 'tokenizer.model'),
      packing='best_fit',
      pack_buffer=32,
    )
  )
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, tensor=1, sequence=1)))
  batch_sharding = sharding.batch_sharding(mesh, (8, 64))
  shard = batch_input.shard_for(batch_sharding, 8, 64)  # data 8 over 2 processes: 2 shards
  batches = pipeline.build(
    data_cfg, seed=0, split='train', process_index=shard.index, process_count=shard.count
  )
  local = next(batches)
  global_inputs = batch_input.global_batch(batch_sharding, shard, local, ['inputs'])['inputs']
  gathered = multihost_utils.process_allgather(global_inputs, tiled=True)
  np.savez(
    os.path.join(out_dir, f'process{jax.process_index()}.npz'),
    local=local['inputs'],
    gathered=np.asarray(gathered),
    shape=np.asarray(global_inputs.shape),
    devices=len(jax.devices()),
    local_devices=len(jax.local_devices()),
  )
  jax.distributed.shutdown()


if __name__ == '__main__':
  main(*sys.argv[1:])
