"""The mesh follows the topology: tensor groups inside a process (or NVLink slice), sequence
next, data outermost, at K2-V2's full sizes, with stand-in devices; clear errors otherwise."""

import dataclasses
import random

import jax
import ml_collections
import numpy as np
import pytest

from k2jax import run_config
from k2jax.parallel import mesh as device_mesh
from k2jax.parallel import sharding


@dataclasses.dataclass(frozen=True)
class Device:
  """What the builder reads of a jax device."""

  id: int
  process_index: int
  slice_index: int | None = None


def cluster(processes: int, per_process: int, per_slice: int | None = None):
  """Devices of `processes` processes (ids as multi-process CPU numbers them), shuffled so the
  builder must sort; with `per_slice`, every that many processes share a slice (GPU nodes
  whose processes each drive one GPU)."""
  devices = [
    Device(
      id=p * 2048 + i,
      process_index=p,
      slice_index=None if per_slice is None else p // per_slice,
    )
    for p in range(processes)
    for i in range(per_process)
  ]
  random.Random(0).shuffle(devices)
  return devices


def grid(devices, data, tensor, sequence):
  array, _ = device_mesh.device_grid(dict(data=data, tensor=tensor, sequence=sequence), devices)
  assert array.shape == (data, tensor, sequence)
  assert sorted(d.id for d in array.flat) == sorted(d.id for d in devices)  # each device once
  return array


def groups(array, axis: str, key):
  """The set of `key`s of each group along `axis` (the devices that differ only in it)."""
  rows = np.moveaxis(array, device_mesh.AXES.index(axis), -1).reshape(
    -1, array.shape[device_mesh.AXES.index(axis)]
  )
  return [{key(d) for d in row} for row in rows]


process = lambda d: d.process_index  # noqa: E731
node = lambda d: d.slice_index  # noqa: E731


@pytest.mark.parametrize(
  'processes,per_process,data,tensor,sequence',
  [
    (1, 8, 2, 2, 2),  # one process: plain
    (1, 8, 1, 8, 1),
    (2, 4, 2, 4, 1),
    (2, 4, 1, 4, 2),  # sequence crosses the two processes
    (2, 4, 4, 2, 1),  # data inside and across processes
    (4, 2, 2, 2, 2),
    (4, 2, 1, 2, 4),
  ],
)
def test_tensor_groups_stay_in_a_process(processes, per_process, data, tensor, sequence):
  array = grid(cluster(processes, per_process), data, tensor, sequence)
  assert all(len(g) == 1 for g in groups(array, 'tensor', process))
  # Each tensor group is consecutive devices of its process (one NVLink neighbourhood).
  for row in np.moveaxis(array, 1, -1).reshape(-1, tensor):
    ids = [d.id for d in row]
    assert ids == list(range(ids[0], ids[0] + tensor))
  # What is left of a process goes to sequence before data.
  left = per_process // tensor
  if sequence > 1 and left > 1:
    assert all(len(g) == max(1, sequence // left) for g in groups(array, 'sequence', process))


def test_k2v2_meshes_at_full_size():
  """K2-V2's runs, one process per 8-GPU node: pre-training (400 nodes), mid-training stage 3
  (200 nodes, data 100 x sequence 2) and stage 4 (200 nodes, data 25 x sequence 8)."""
  pretrain = grid(cluster(400, 8), 400, 8, 1)
  assert all(len(g) == 1 for g in groups(pretrain, 'tensor', process))
  assert all(len(g) == 400 for g in groups(pretrain, 'data', process))
  assert device_mesh.placement(pretrain, device_mesh.AXES) == (
    'data 400 across 400 processes; tensor 8 within each process'
  )
  nodes = cluster(200, 8)
  for data, sequence in ((100, 2), (25, 8)):
    array = grid(nodes, data, 8, sequence)
    assert all(len(g) == 1 for g in groups(array, 'tensor', process))
    # Each context-parallel group spans `sequence` nodes, each data group `data` nodes.
    assert all(len(g) == sequence for g in groups(array, 'sequence', process))
    assert all(len(g) == data for g in groups(array, 'data', process))
    assert device_mesh.placement(array, device_mesh.AXES) == (
      f'data {data} across {data} processes; tensor 8 within each process; '
      f'sequence {sequence} across {sequence} processes'
    )


def test_slices_are_the_granule_when_there_are_several():
  """One process per GPU (SLURM's default): 8 processes of one device per NVLink slice. The
  slice, not the process, keeps a tensor group together."""
  array = grid(cluster(32, 1, per_slice=8), 2, 8, 2)
  assert all(len(g) == 1 for g in groups(array, 'tensor', node))
  assert all(len(g) == 8 for g in groups(array, 'tensor', process))
  assert device_mesh.placement(array, device_mesh.AXES) == (
    'data 2 across 2 slices; tensor 8 within each slice; sequence 2 across 2 slices'
  )


def test_tensor_larger_than_a_process_spans_the_fewest_processes():
  array = grid(cluster(4, 4), 1, 8, 2)
  assert all(len(g) == 2 for g in groups(array, 'tensor', process))
  assert device_mesh.placement(array, device_mesh.AXES) == (
    'tensor 8 across 2 processes; sequence 2 across 2 processes'
  )


def test_meshes_that_cannot_be_placed_say_why():
  with pytest.raises(ValueError, match=r'mesh.tensor=3 cannot be placed on 4 devices per process'):
    grid(cluster(3, 4), 4, 3, 1)
  with pytest.raises(
    ValueError, match=r'mesh.sequence=3 cannot be placed on 8 devices per process after tensor 2'
  ):
    grid(cluster(3, 8), 4, 2, 3)
  uneven = [d for d in cluster(2, 4) if d.id != 2049]
  with pytest.raises(ValueError, match='every process must hold the same number of devices'):
    device_mesh.device_grid(dict(data=7, tensor=1, sequence=1), uneven)


def mesh_cfg(**kw):
  return ml_collections.ConfigDict({'data': -1, 'tensor': 1, 'sequence': 1, **kw})


def test_real_devices_tensor_innermost_and_hybrid_groups():
  """The 8 simulated CPU devices of one process: tensor groups are consecutive devices, and a
  hybrid FSDP group is the innermost (nearest) data shards."""
  mesh = sharding.make_mesh(mesh_cfg(data=2, tensor=2, sequence=2))
  assert dict(mesh.shape) == {'data': 2, 'tensor': 2, 'sequence': 2}
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  assert ids[0, :, 0].tolist() == [0, 1] and ids[0, 0, :].tolist() == [0, 2]
  assert sharding.describe(mesh, mesh_cfg()) == (
    'data 2 × tensor 2 × sequence 2; placement: every axis within one process'
  )
  hybrid = sharding.make_mesh(mesh_cfg(data=4, tensor=2, fsdp='optimizer', fsdp_group=2))
  assert dict(hybrid.shape) == {'replica': 2, 'data': 2, 'tensor': 2, 'sequence': 1}
  ids = np.vectorize(lambda d: d.id)(hybrid.devices)
  assert ids[0, :, :, 0].tolist() == [[0, 1], [2, 3]]  # group 0: data shards 0 and 1
  assert sharding.describe(hybrid, mesh_cfg(fsdp='optimizer')).startswith(
    'replica 2 × data 2 × tensor 2 × sequence 1 (fsdp optimizer, sharded in groups of 2 data '
    'shards)'
  )
  # A group as large as the data axis, or larger (a stage config on a small mesh), is all of it.
  for group in (4, 8):
    full = sharding.make_mesh(mesh_cfg(data=4, tensor=2, fsdp='full', fsdp_group=group))
    assert 'replica' not in full.axis_names
  # With nothing sharded there are no groups: `--config.mesh.fsdp=none` alone turns it off.
  plain = sharding.make_mesh(mesh_cfg(data=4, tensor=2, fsdp='none', fsdp_group=2))
  assert 'replica' not in plain.axis_names


def test_fsdp_modes_and_old_booleans():
  assert [device_mesh.fsdp_mode(v) for v in (True, False, 'True', 'false')] == [
    'full',
    'none',
    'full',
    'none',
  ]
  assert [device_mesh.fsdp_mode(v) for v in device_mesh.FSDP_MODES] == list(device_mesh.FSDP_MODES)
  with pytest.raises(ValueError, match=r"mesh.fsdp='zero1' is not one of none\|optimizer\|full"):
    device_mesh.fsdp_mode('zero1')
  with pytest.raises(ValueError, match='mesh.fsdp_group=3 does not divide the data axis'):
    sharding.make_mesh(mesh_cfg(data=4, tensor=2, fsdp='full', fsdp_group=3))


@pytest.mark.parametrize(
  'mesh,message',
  [
    (dict(fsdp='zero3'), "mesh.fsdp='zero3' is not one of none|optimizer|full"),
    (dict(fsdp='optimizer', fsdp_group=-2), 'mesh.fsdp_group must be an integer >= 0'),
    (dict(fsdp='optimizer', data=12, fsdp_group=8), 'mesh.fsdp_group=8 does not divide'),
  ],
)
def test_config_validation_names_the_key(mesh, message):
  from tests.helpers import small_config

  cfg = small_config(**{f'mesh.{k}': v for k, v in mesh.items()})
  with pytest.raises(ValueError) as raised:
    run_config.validate(cfg)
  assert message in str(raised.value)


def test_stage_configs_shard_as_k2v2s_distributed_optimizer():
  """ZeRO-1 in groups that divide the stage's data axis on K2-V2's cluster and, times its
  sequence degree, the 8192-wide embed (the whole 400-way data axis cannot split it)."""
  from configs import midtrain

  # SFT's GPU count is not in the released scripts [?]: 128 nodes, as k2jax/planner.py assumes.
  data_shards = {'configs/pretrain.py': 400, 'configs/sft.py': 128}
  for stage, (*_, sequence, gpus) in midtrain.STAGES.items():
    data_shards[f'configs/midtrain.py:{stage}'] = gpus // (8 * sequence)
  for spec, data in data_shards.items():
    cfg = run_config.load(spec)
    assert cfg.mesh.fsdp == 'optimizer', spec
    group = device_mesh.fsdp_group(cfg.mesh, data)
    assert data % group == 0 and 8192 % (group * cfg.mesh.sequence) == 0, spec
    debug = run_config.load(spec + (',debug' if ':' in spec else ':debug'))
    assert (debug.mesh.fsdp, debug.mesh.fsdp_group) == ('none', 0), spec


def test_a_mesh_from_jax_devices_is_a_jax_mesh():
  mesh = sharding.make_mesh(mesh_cfg(data=2, tensor=4))
  assert isinstance(mesh, jax.sharding.Mesh) and mesh.devices.shape == (2, 4, 1)
