"""Input for any mesh (k2jax/parallel/input.py): which rows each process loads.

Pure arithmetic at K2-V2's full size (1,600 GPUs on 200 hosts) without devices; the emulated
row split checked against JAX's own on real shardings; and two processes on localhost (4
simulated devices each) training on meshes where tensor, sequence or data span both processes,
with the losses of one process on 8 devices fed the same global batch.
"""

import json
import os
import sys

import numpy as np
import pytest

from k2jax.parallel import input as batch_input
from tests.helpers import REPO, free_port, small_config, start_processes

# --- arithmetic at full size, without devices --------------------------------------------------

GPUS_PER_HOST = 8
AXES = ('data', 'tensor', 'sequence')


def topology_processes(data: int, tensor: int, sequence: int) -> np.ndarray:
  """The process of each mesh position [data, tensor, sequence] when devices fill each host
  tensor first, then sequence, then data (k2jax/parallel/mesh.py's placement), one process
  per host of GPUS_PER_HOST GPUs."""
  d, t, s = np.meshgrid(np.arange(data), np.arange(tensor), np.arange(sequence), indexing='ij')
  rank = (d * sequence + s) * tensor + t  # tensor innermost, then sequence, then data
  return rank // GPUS_PER_HOST


def stage_layout(stage: str):
  """(global batch, mesh sizes, GPUs) of a K2-V2 stage, from configs/midtrain.py."""
  from configs import midtrain

  cfg = midtrain.get_config(stage)
  gpus = midtrain.STAGES[stage][-1]
  tensor, sequence = cfg.mesh.tensor, cfg.mesh.sequence
  return cfg.data.global_batch_size, (gpus // (tensor * sequence), tensor, sequence), gpus


@pytest.mark.parametrize(
  'stage, sizes, hosts_per_row', [('stage3', (100, 8, 2), 2), ('stage4', (25, 8, 8), 8)]
)
def test_k2v2_long_context_stages_at_full_size(stage, sizes, hosts_per_row):
  """Stage 3: data 100 × sequence 2 × tensor 8, 100 rows; stage 4: data 25 × sequence 8 ×
  tensor 8, 25 rows; 1,600 GPUs on 200 hosts: each row is loaded by the 2 / 8 hosts that
  hold its data shard, one row each, and every host of a row agrees on it."""
  global_batch, mesh_sizes, gpus = stage_layout(stage)
  assert mesh_sizes == sizes and gpus == 1600
  processes = topology_processes(*mesh_sizes)
  assert processes.max() + 1 == 200
  rows = batch_input.mesh_device_rows(processes, AXES, 'data', global_batch)
  shards = [batch_input.shard_of(rows, p, global_batch) for p in range(200)]
  assert {(s.count, s.rows, s.process_count) for s in shards} == {(global_batch, 1, 200)}
  assert global_batch == sizes[0]
  # The hosts of one data shard (consecutive here) load the same row; the others another.
  assert [s.index for s in shards] == [p // hosts_per_row for p in range(200)]


def test_k2v2_pretraining_at_full_size():
  """Pre-training: data 400 × tensor 8 on 400 hosts, each loads its own rows."""
  from configs import pretrain

  global_batch = pretrain.get_config().data.global_batch_size
  processes = topology_processes(400, 8, 1)
  rows = batch_input.mesh_device_rows(processes, AXES, 'data', global_batch)
  shard = batch_input.shard_of(rows, 399, global_batch)
  assert (shard.index, shard.count, shard.rows) == (399, 400, global_batch // 400)


def test_hybrid_rows_split_over_replica_and_data():
  """Rows over ('replica', 'data') (hybrid sharding): replica varies slowest."""
  processes = np.arange(8).reshape(2, 2, 2) // 2  # [replica, data, tensor]; tensor in-process
  rows = batch_input.mesh_device_rows(
    processes, ('replica', 'data', 'tensor'), ('replica', 'data'), 8
  )
  assert [batch_input.shard_of(rows, p, 8).index for p in range(4)] == [0, 1, 2, 3]


def test_rows_that_cannot_be_divided_are_refused_in_one_line():
  with pytest.raises(ValueError, match='global_batch_size 100 is not divisible by mesh axis data'):
    batch_input.mesh_device_rows(topology_processes(8, 8, 1), AXES, 'data', 100)
  # Processes holding different numbers of rows: 3 data shards on one process, 1 on another.
  processes = np.array([0, 0, 0, 1]).reshape(4, 1, 1)
  rows = batch_input.mesh_device_rows(processes, AXES, 'data', 8)
  with pytest.raises(ValueError) as raised:
    batch_input.shard_of(rows, 0, 8)
  text = str(raised.value)
  assert 'data.global_batch_size 8 over mesh axis data on 2 process(es)' in text, text
  assert 'unequal' in text and '\n' not in text, text
  # Overlapping but different row sets: no split into input shards serves both processes.
  rows = [(0, 0, 2), (0, 2, 4), (1, 2, 4), (1, 4, 6), (2, 0, 2), (2, 4, 6)]
  with pytest.raises(ValueError, match='overlapping but different'):
    batch_input.shard_of(rows, 0, 6)


def test_emulated_rows_match_jax_sharding():
  """mesh_device_rows's split is a NamedSharding's, on a permuted device order and on rows
  split over two axes."""
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  devices = np.array(jax.devices()[:8])[np.random.default_rng(0).permutation(8)]
  for names, shape, rows_spec in (
    (('data', 'tensor', 'sequence'), (2, 2, 2), 'data'),
    (('replica', 'data', 'tensor'), (2, 2, 2), ('replica', 'data')),
    (('data', 'tensor', 'sequence'), (4, 1, 2), 'data'),
  ):
    mesh = Mesh(devices.reshape(shape), names)
    sharding = NamedSharding(mesh, PartitionSpec(rows_spec, None))
    by_device = {
      d: rows
      for d, rows in zip(
        sharding.devices_indices_map((8, 16)), batch_input.sharding_device_rows(sharding, (8, 16))
      )
    }
    emulated = batch_input.mesh_device_rows(np.zeros(shape, int), names, rows_spec, 8)
    for position, rows in zip(np.ndindex(shape), emulated):
      assert by_device[mesh.devices[position]] == rows, (names, position)


def test_global_batch_checks_the_local_rows():
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ('data', 'sequence'))
  sharding = NamedSharding(mesh, PartitionSpec('data', 'sequence'))
  shard = batch_input.shard_for(sharding, 8, 16)
  assert (shard.index, shard.count, shard.rows) == (0, 1, 8)
  local = {'inputs': np.arange(8 * 16).reshape(8, 16)}
  array = batch_input.global_batch(sharding, shard, local, ['inputs'])['inputs']
  assert array.shape == (8, 16) and array.sharding == sharding
  np.testing.assert_array_equal(np.asarray(array), local['inputs'])
  with pytest.raises(ValueError, match="batch 'inputs' has 4 rows on this process"):
    batch_input.global_batch(sharding, shard, {'inputs': local['inputs'][:4]}, ['inputs'])


# --- two processes on localhost ----------------------------------------------------------------

STEPS = 3
# name: (mesh overrides, expected input shard count on 2 processes × 4 devices)
# Which axes span the processes is read from the mesh built (the test asserts all three do).
MESHES = {
  'data1_tensor8': (dict(data=1, tensor=8, sequence=1), 1),  # tensor spans both processes
  # Stage 3's shape: tensor within each process, sequence across both.
  'data1_tensor4_sequence2': (dict(data=1, tensor=4, sequence=2), 1),
  'data2_tensor4': (dict(data=2, tensor=4, sequence=1), 2),  # data across processes
}


def mesh_config(name: str):
  """The small config (2 layers, 8 × 64 tokens) on mesh `name`, STEPS steps, no saves; 8 KV
  heads so that tensor 8 divides them."""
  mesh, _ = MESHES[name]
  overrides = {f'mesh.{axis}': size for axis, size in mesh.items()}
  return small_config(
    total_steps=STEPS,
    **overrides,
    **{'checkpoint.every': 0, 'model.num_kv_heads': 8, 'optim.warmup_steps': 1},
  )


def reference_losses(name: str, shards: int) -> list[float]:
  """One process on 8 devices: the global batch is input shard 0's rows, then shard 1's, ...
  (as `shards` processes would load them), put on the devices whole."""
  import jax

  from data_pipeline import pipeline
  from k2jax.parallel import sharding
  from k2jax.training import train_step

  cfg = mesh_config(name)
  plan = train_step.plan(cfg)
  streams = [
    pipeline.build(
      cfg.data,
      seed=cfg.seed,
      split='train',
      process_index=i,
      process_count=shards,
      context_shards=sharding.length_shards(plan.mesh),
    )
    for i in range(shards)
  ]
  with sharding.activate(plan.mesh, cfg.mesh.fsdp):
    init = jax.jit(
      train_step.make_init_fn(plan.model, plan.tx, cfg.data.seq_len),
      out_shardings=plan.state_sharding,
    )
    state = init(jax.random.key(cfg.seed))
    step_fn = plan.jit_train_step()
    losses = []
    for _ in range(STEPS):
      parts = [next(stream) for stream in streams]
      batch = {
        key: jax.device_put(np.concatenate([p[key] for p in parts]), plan.batch_sharding)
        for key in train_step.BATCH_KEYS
      }
      state, metrics = step_fn(state, batch)
      losses.append(float(metrics['loss']))
  return losses


@pytest.mark.slow
def test_two_processes_train_on_any_mesh_as_one(tmp_path):
  port = str(free_port())
  worker = os.path.join(REPO, 'tests', 'multihost_input_worker.py')
  procs = start_processes(lambda i: [sys.executable, worker, port, str(i), '2', str(tmp_path)])
  outputs = [proc.communicate(timeout=600)[0] for proc in procs]
  for proc, output in zip(procs, outputs):
    assert proc.returncode == 0, output[-3000:]
  spanned = set()
  for name, (_, shard_count) in MESHES.items():
    results = [json.load(open(tmp_path / name / f'process{i}.json')) for i in range(2)]
    assert all(r['local_devices'] == 4 for r in results)
    rows = 8 // shard_count
    assert [r['shard'] for r in results] == [
      [min(i, shard_count - 1), shard_count, rows] for i in range(2)
    ], name
    spanned |= set(results[0]['spans'])
    want = reference_losses(name, shard_count)
    np.testing.assert_allclose(results[0]['losses'], want, rtol=1e-5, err_msg=name)
  assert {'data', 'tensor', 'sequence'} <= spanned, spanned
