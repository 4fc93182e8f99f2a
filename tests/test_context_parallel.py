"""Context parallelism: zigzag rows, and the loss and gradients of CP 2, 4 and 8 equal to no CP
(documents crossing shard borders, GQA); the stage 3 and 4 debug configs from the command line."""

import dataclasses
import re

import jax
import ml_collections
import numpy as np
import pytest

from data_pipeline import load_balance
from k2jax.model.transformer import Transformer
from k2jax.parallel import sharding
from k2jax.training import train_step
from tests.helpers import TINY, cli_env, random_params, read_metrics, run_cli

BATCH, LENGTH = 2, 96  # no model dim is 96: the HLO check below finds only [L, L] buffers


def make_batch(seed=0):
  """Three documents per row, their borders inside CP shards and across them."""
  rng = np.random.default_rng(seed)
  sizes = (31, 44, 21)
  segments = np.repeat(np.arange(1, 4), sizes)
  positions = np.concatenate([np.arange(n) for n in sizes])
  return {
    'inputs': rng.integers(0, TINY.vocab_size, (BATCH, LENGTH)).astype(np.int32),
    'targets': rng.integers(0, TINY.vocab_size, (BATCH, LENGTH)).astype(np.int32),
    'positions': np.broadcast_to(positions, (BATCH, LENGTH)).astype(np.int32),
    'segment_ids': np.broadcast_to(segments, (BATCH, LENGTH)).astype(np.int32),
    'loss_mask': (rng.random((BATCH, LENGTH)) > 0.2).astype(np.float32),
  }


def test_zigzag_order_balances_causal_work_and_round_trips():
  order = load_balance.zigzag_order(16, 4)
  np.testing.assert_array_equal(order[:4], [0, 1, 14, 15])  # shard 0: chunks 0 and 7
  # Causal (query, key) pairs per shard of a 64-token row: equal in zigzag order.
  order = load_balance.zigzag_order(64, 4).reshape(4, 16)
  assert {int(np.sum(shard + 1)) for shard in order} == {520}
  batch = make_batch()
  shuffled = load_balance.reorder(batch, 4)
  assert not np.array_equal(shuffled['inputs'], batch['inputs'])
  for key, value in load_balance.restore(shuffled, 4).items():
    np.testing.assert_array_equal(value, batch[key])
  with pytest.raises(
    ValueError, match=r'data.seq_len=100 is not divisible by 2 x mesh.sequence = 16'
  ):
    load_balance.check(100, 8)


def loss_and_grads(cfg, mesh_shape, batch):
  model, params = Transformer(cfg), random_params(cfg)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(zip(sharding.AXES, mesh_shape))))
  with sharding.activate(mesh, True):
    step = jax.jit(lambda p, b: train_step.loss_and_grads(model, p, b, accum_steps=1)[:2])
    lowered = step.lower(params, batch)
    return (*step(params, batch), lowered.compile().as_text())


@pytest.mark.parametrize('backend', ['xla', 'blockwise'])
@pytest.mark.parametrize('mesh_shape', [(2, 2, 2), (1, 2, 4), (1, 1, 8)])
def test_context_parallel_loss_and_gradients_equal_no_cp(backend, mesh_shape):
  cfg = dataclasses.replace(TINY, attention=backend, attention_block_q=8, attention_block_kv=8)
  batch = make_batch()
  want_loss, want_grads, _ = loss_and_grads(cfg, (8, 1, 1), batch)
  shards = mesh_shape[2]
  loss, grads, hlo = loss_and_grads(cfg, mesh_shape, load_balance.reorder(batch, shards))
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, want_grads
  )
  assert 'all-gather' in hlo  # keys gathered, queries local
  if backend == 'blockwise':  # linear memory: no [L, L] buffer anywhere in the step
    assert not re.search(rf'\b{LENGTH},{LENGTH}\]', hlo)


def test_pallas_under_context_parallelism_equals_no_cp():
  cfg = dataclasses.replace(TINY, attention='pallas', attention_block_q=16, attention_block_kv=16)
  batch = make_batch(1)
  want_loss, want_grads, _ = loss_and_grads(
    dataclasses.replace(cfg, attention='xla'), (8, 1, 1), batch
  )
  loss, grads, _ = loss_and_grads(cfg, (2, 2, 2), load_balance.reorder(batch, 2))
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, want_grads
  )


def first_losses(tmp_path, stage, devices, sequence):
  workdir = tmp_path / f'{stage}-cp{sequence}'
  run_cli(
    'k2jax.train',
    f'--config=configs/midtrain.py:{stage},debug',
    f'--workdir={workdir}',
    '--config.total_steps=2',
    '--config.log_every=1',
    '--config.eval_every=0',
    '--config.checkpoint.every=0',
    '--config.model.num_layers=2',
    '--config.mesh.data=1',
    f'--config.mesh.sequence={sequence}',
    check=True,
    env=cli_env(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}'),
  )
  return [r['loss'] for r in read_metrics(workdir) if 'loss' in r]


@pytest.mark.slow
@pytest.mark.parametrize('stage,sequence', [('stage3', 2), ('stage4', 8)])
def test_stage_trains_with_context_parallelism_like_one_device(tmp_path, stage, sequence):
  one = first_losses(tmp_path, stage, 1, 1)
  split = first_losses(tmp_path, stage, sequence, sequence)
  assert len(one) == 2 and split == pytest.approx(one, rel=2e-3)


def test_a_length_the_sequence_axis_cannot_split_stays_whole():
  """E.g. 12 tokens on sequence 8: every device attends over whole rows, keys not re-gathered."""
  from k2jax.model.kernels.reference import dense_attention
  from k2jax.parallel import context

  rng = np.random.default_rng(2)
  q, k, v = (rng.normal(size=(1, 12, h, 8)).astype(np.float32) for h in (4, 2, 2))
  positions = np.arange(12)[None].astype(np.int32)
  segments = np.ones((1, 12), np.int32)
  args = (q, k, v, positions, positions, segments, segments)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, tensor=1, sequence=8)))
  with sharding.activate(mesh, False):
    attend = jax.jit(context.shard_attention(dense_attention, custom_call=True))
    out, hlo = attend(*args), attend.lower(*args).compile().as_text()
  np.testing.assert_allclose(out, dense_attention(*args), rtol=1e-6, atol=1e-6)
  assert 'all-gather' not in hlo
