"""Sharded forward / gradient / train step equal the single-device result in every `mesh.fsdp`
mode (hybrid groups included), the state lies as each mode says; clear mesh errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from k2jax.model.config import ModelConfig
from k2jax.model.transformer import Transformer
from k2jax.parallel import sharding
from k2jax.training import optim, train_step

CFG = ModelConfig(
  vocab_size=256,
  hidden_size=64,
  ffn_size=128,
  num_layers=2,
  num_heads=8,
  num_kv_heads=4,
  head_dim=8,
  dtype='float32',
  remat='full',
)
BATCH, LENGTH = 8, 16


def make_batch(seed=0):
  rng = np.random.default_rng(seed)
  segments = np.repeat(np.array([[1] * 10 + [2] * 6]), BATCH, axis=0).astype(np.int32)
  positions = np.concatenate([np.arange(10), np.arange(6)])
  return {
    'inputs': rng.integers(0, CFG.vocab_size, (BATCH, LENGTH)).astype(np.int32),
    'targets': rng.integers(0, CFG.vocab_size, (BATCH, LENGTH)).astype(np.int32),
    'positions': np.broadcast_to(positions, (BATCH, LENGTH)).astype(np.int32),
    'segment_ids': segments,
    'loss_mask': (rng.random((BATCH, LENGTH)) > 0.2).astype(np.float32),
  }


def mesh_cfg(data, tensor, seq, fsdp='none', group=0):
  return ml_collections.ConfigDict(
    dict(data=data, tensor=tensor, sequence=seq, fsdp=fsdp, fsdp_group=group)
  )


MODEL = Transformer(CFG)
PARAMS = jax.jit(lambda k: nn.unbox(MODEL.init(k, jnp.zeros((1, LENGTH), jnp.int32))['params']))(
  jax.random.key(0)
)


def forward_and_grads(params, batch):
  logits = MODEL.apply(
    {'params': params}, batch['inputs'], batch['positions'], batch['segment_ids']
  )
  loss, grads, _ = train_step.loss_and_grads(MODEL, params, batch, accum_steps=1)
  return logits, loss, grads


def reference():
  one_device = jax.devices()[:1]
  with jax.default_device(one_device[0]):
    return jax.jit(forward_and_grads)(PARAMS, make_batch())


REF_LOGITS, REF_LOSS, REF_GRADS = reference()


@pytest.mark.parametrize(
  'shape,fsdp',
  [
    ((8, 1, 1), 'none'),
    ((2, 4, 1), False),  # an old config's boolean: none
    ((2, 2, 2), 'none'),
    ((4, 2, 1), 'optimizer'),
    ((4, 2, 1), True),  # full
    ((2, 2, 2), 'full'),
  ],
)
def test_sharded_forward_and_gradient_match_single_device(shape, fsdp):
  mesh = sharding.make_mesh(mesh_cfg(*shape))
  boxed = train_step.abstract_params(MODEL, LENGTH)
  param_sharding = sharding.param_shardings(mesh, boxed, fsdp)
  batch_sharding = sharding.batch_sharding(mesh, (BATCH, LENGTH), fsdp)
  params = jax.device_put(PARAMS, param_sharding)
  batch = jax.device_put(make_batch(), batch_sharding)
  with sharding.activate(mesh, fsdp):
    fn = jax.jit(
      forward_and_grads,
      in_shardings=(param_sharding, batch_sharding),
      out_shardings=(None, None, param_sharding),
    )
    logits, loss, grads = fn(params, batch)

  # The layout is what the rules say: heads over tensor, embed (of the parameters) over data
  # and the context-parallel ranks only with full FSDP.
  embed = ('data', 'sequence') if sharding.fsdp_mode(fsdp) == 'full' else None
  q_spec = grads['layers']['attention']['q'].sharding.spec
  assert tuple(q_spec) == (None, embed, 'tensor', None)
  assert tuple(params['embedding'].sharding.spec) == ('tensor', embed)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(REF_LOGITS), atol=2e-5, rtol=0)
  np.testing.assert_allclose(loss, REF_LOSS, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4),
    grads,
    REF_GRADS,
  )


def optimizer():
  cfg = ml_collections.ConfigDict(
    dict(
      peak_lr=1e-2,
      min_lr=1e-3,
      warmup_steps=0,
      schedule='cosine',
      decay_steps=0,
      b1=0.9,
      # eps well above rounding noise: Adam's g / (sqrt(v) + eps) would otherwise turn a
      # 1e-9 gradient's rounding into a full-size update and the comparison into noise.
      b2=0.95,
      eps=1e-4,
      weight_decay=0.05,
      clip_norm=1.0,
    )
  )
  boxed = train_step.abstract_params(MODEL, LENGTH)
  return (
    optim.make_optimizer(cfg, 10, train_step.weight_decay_mask(boxed)),
    optim.make_schedule(cfg, 10),
    boxed,
  )


def run_steps(mesh_shape, fsdp, accum_steps=1, steps=2, devices=None, group=0):
  """(losses, host params, final state) of `steps` steps laid out as train_step.plan does."""
  tx, schedule, boxed = optimizer()
  mesh = sharding.make_mesh(mesh_cfg(*mesh_shape, fsdp=fsdp, group=group), devices)
  _, state_sharding = train_step.state_shardings(mesh, tx, boxed, fsdp)
  update_sharding = sharding.update_shardings(mesh, boxed, fsdp)
  batch_sharding = sharding.batch_sharding(mesh, (BATCH, LENGTH), fsdp)
  with sharding.activate(mesh, fsdp):
    state = jax.jit(train_step.make_init_fn(MODEL, tx, LENGTH), out_shardings=state_sharding)(
      jax.random.key(0)
    )
    step = jax.jit(
      train_step.make_train_step(
        MODEL,
        tx,
        schedule,
        accum_steps,
        param_sharding=state_sharding.params,
        update_sharding=update_sharding,
      ),
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, None),
      donate_argnums=0,
    )
    losses = []
    for i in range(steps):
      state, metrics = step(state, jax.device_put(make_batch(i), batch_sharding))
      losses.append(float(metrics['loss']))
  return losses, jax.device_get(state.params), state


REFERENCE_STEPS = {}


def reference_steps():
  """The single-device steps (computed once, shared by the equality tests)."""
  if not REFERENCE_STEPS:
    losses, params, _ = run_steps((1, 1, 1), fsdp='none', devices=jax.devices()[:1])
    REFERENCE_STEPS.update(losses=losses, params=params)
  return REFERENCE_STEPS['losses'], REFERENCE_STEPS['params']


def assert_same_steps(losses, params):
  ref_losses, ref_params = reference_steps()
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  # Adam divides by sqrt(v): near-zero gradients amplify rounding, so compare against the
  # step size (lr 1e-2): 1e-5 is 0.1% of one update.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), params, ref_params
  )


def test_train_steps_match_across_meshes_and_accumulation():
  """Two full steps (with AdamW and its sharded state) equal the single-device steps."""
  for shape, fsdp, accum in [((2, 2, 2), 'full', 1), ((2, 4, 1), 'none', 2), ((8, 1, 1), True, 4)]:
    losses, params, _ = run_steps(shape, fsdp, accum)
    assert_same_steps(losses, params)


def q_layouts(state):
  """Per-device shapes of layers/attention/q [layers, embed 64, heads 8, head_dim 8]: the
  parameter, and Adam's mu and nu (the opt-state leaves of its shape)."""
  q = state.params['layers']['attention']['q']
  moments = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.shape == q.shape]
  assert len(moments) == 2  # mu and nu
  local = lambda a: a.sharding.shard_shape(a.shape)  # noqa: E731
  return local(q), {local(m) for m in moments}


@pytest.mark.parametrize(
  'shape,fsdp,group,accum,param_q,moment_q',
  [
    # ZeRO-1: moments (and gradients, the update) split over data (x sequence), parameters
    # whole but for tensor; accumulation sums the micro-batch gradients in that layout.
    ((4, 2, 1), 'optimizer', 0, 2, (2, 64, 4, 8), (2, 16, 4, 8)),
    ((2, 2, 2), 'optimizer', 0, 1, (2, 64, 4, 8), (2, 16, 4, 8)),
    # Hybrid: sharded within groups of 2 data shards, replicated across the 2 groups.
    ((4, 2, 1), 'optimizer', 2, 1, (2, 64, 4, 8), (2, 32, 4, 8)),
    ((2, 1, 4), 'full', 1, 1, (2, 16, 8, 8), (2, 16, 8, 8)),  # groups of 1: over sequence only
    ((4, 1, 2), 'full', 2, 2, (2, 16, 8, 8), (2, 16, 8, 8)),
  ],
)
def test_fsdp_modes_match_single_device_and_shard_as_claimed(
  shape, fsdp, group, accum, param_q, moment_q
):
  losses, params, state = run_steps(shape, fsdp, accum, group=group)
  assert_same_steps(losses, params)
  assert q_layouts(state) == (param_q, {moment_q})
  mesh = state.params['embedding'].sharding.mesh
  hybrid = 0 < group < shape[0]
  assert ('replica' in mesh.axis_names) == hybrid
  if hybrid:  # the batch still splits over every data shard
    assert (mesh.shape['replica'], mesh.shape['data']) == (shape[0] // group, group)
    assert sharding.batch_shards(mesh) == shape[0]


def test_weight_decay_skips_stacked_norm_scales():
  mask = train_step.weight_decay_mask(train_step.abstract_params(MODEL, LENGTH))
  assert mask['layers']['attention_norm']['scale'] is False  # 2-D only because stacked
  assert mask['final_norm']['scale'] is False
  assert mask['layers']['mlp']['up'] is True and mask['embedding'] is True


def test_mesh_shape_fill_and_errors():
  assert sharding.mesh_shape(mesh_cfg(-1, 2, 2), 8) == (2, 2, 2)
  assert sharding.mesh_shape(mesh_cfg(8, 1, 1), 8) == (8, 1, 1)
  with pytest.raises(ValueError, match='only one mesh axis may be -1'):
    sharding.mesh_shape(mesh_cfg(-1, -1, 1), 8)
  with pytest.raises(ValueError, match=r'mesh.data=-1 cannot fill 8 devices'):
    sharding.mesh_shape(mesh_cfg(-1, 3, 1), 8)
  with pytest.raises(ValueError, match=r'4 devices, but 8 are available'):
    sharding.mesh_shape(mesh_cfg(2, 2, 1), 8)


def test_a_mesh_that_does_not_fit_names_its_axes_and_the_cpu_fix():
  """The axes and their sizes; on CPU, the simulated device count that would fit."""
  flag = 'XLA_FLAGS=--xla_force_host_platform_device_count='
  with pytest.raises(ValueError) as raised:
    sharding.make_mesh(mesh_cfg(4, 2, 2))  # the 8 simulated CPU devices
  text = str(raised.value)
  assert 'mesh data 4 × tensor 2 × sequence 2 needs 16 devices, but 8 are available' in text
  assert f'{flag}16' in text, text
  with pytest.raises(ValueError) as raised:
    sharding.make_mesh(mesh_cfg(-1, 3, 1))
  text = str(raised.value)
  assert 'tensor 3 × sequence 1 = 3 does not divide 8' in text and f'{flag}9' in text, text
  # On an accelerator the CPU flag would be no help: not offered.
  with pytest.raises(ValueError) as raised:
    sharding.mesh_shape(mesh_cfg(4, 2, 2), 8, platform='gpu')
  assert 'XLA_FLAGS' not in str(raised.value)


def test_indivisible_dimension_names_dim_and_axis():
  mesh = sharding.make_mesh(mesh_cfg(1, 8, 1))
  boxed = train_step.abstract_params(MODEL, LENGTH)  # kv_heads = 4 cannot split 8 ways
  with pytest.raises(
    ValueError,
    match=r'parameter layers/attention/k: dimension 2 '
    r'\(kv_heads=4\) is not divisible by mesh axis '
    r"'tensor' of size 8",
  ):
    sharding.param_shardings(mesh, boxed, fsdp=False)
  mesh = sharding.make_mesh(mesh_cfg(4, 1, 2))
  with pytest.raises(
    ValueError,
    match=r'dimension 0 \(activation_batch=6\) is not divisible '
    r"by mesh axis 'data' of size 4",
  ):
    sharding.batch_sharding(mesh, (6, 16))
  with pytest.raises(
    ValueError,
    match=r'activation_length=15\) is not divisible by mesh axis '
    r"'sequence' of size 2",
  ):
    sharding.batch_sharding(mesh, (8, 15))


def test_parameter_without_rule_is_an_error():
  mesh = sharding.make_mesh(mesh_cfg(8, 1, 1))
  boxed = {'w': nn.Partitioned(jax.ShapeDtypeStruct((8, 8), jnp.float32), ('embed', 'mystery'))}
  with pytest.raises(ValueError, match="parameter w: logical axis 'mystery' has no sharding rule"):
    sharding.param_shardings(mesh, boxed, fsdp=False)


def test_optimizer_state_that_cannot_split_over_data_points_to_a_group():
  """As K2-V2's 8192-wide embed over 400 data shards: ZeRO-1 keeps the weights whole, but their
  optimizer state cannot split; the message names it and the way out."""
  boxed = {'w': nn.Partitioned(jax.ShapeDtypeStruct((12, 8), jnp.float32), ('embed', 'mlp'))}
  mesh = sharding.make_mesh(mesh_cfg(8, 1, 1, fsdp='optimizer'))
  assert tuple(sharding.param_shardings(mesh, boxed, 'optimizer')['w'].spec) == (None, 'tensor')
  with pytest.raises(
    ValueError,
    match=r'optimizer state of parameter w: dimension 0 \(embed=12\) is not divisible by mesh '
    r'axes data×sequence of size 8; .* or shard over a group with mesh.fsdp_group',
  ):
    sharding.update_shardings(mesh, boxed, 'optimizer')
  grouped = sharding.make_mesh(mesh_cfg(8, 1, 1, fsdp='optimizer', group=4))
  assert tuple(sharding.update_shardings(grouped, boxed, 'optimizer')['w'].spec) == (
    ('data', 'sequence'),
    'tensor',
  )


def test_a_non_finite_step_changes_nothing_under_zero1():
  """ZeRO-1 skips a non-finite update on each device's slice (by adding zeros) before the
  gather: the parameters and the optimizer state come back bit for bit."""
  tx, schedule, boxed = optimizer()
  mesh = sharding.make_mesh(mesh_cfg(4, 2, 1, fsdp='optimizer'))
  _, state_sharding = train_step.state_shardings(mesh, tx, boxed, 'optimizer')
  batch_sharding = sharding.batch_sharding(mesh, (BATCH, LENGTH))
  batch = make_batch()
  batch['loss_mask'][0, 0] = np.nan
  with sharding.activate(mesh, 'optimizer'):
    state = jax.jit(train_step.make_init_fn(MODEL, tx, LENGTH), out_shardings=state_sharding)(
      jax.random.key(0)
    )
    before = jax.device_get(state)
    step = jax.jit(
      train_step.make_train_step(
        MODEL,
        tx,
        schedule,
        1,
        param_sharding=state_sharding.params,
        update_sharding=sharding.update_shardings(mesh, boxed, 'optimizer'),
      ),
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, None),
    )
    after, metrics = step(state, jax.device_put(batch, batch_sharding))
  assert metrics['skipped'] == 1.0 and metrics['update_norm'] == 0.0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(after.params), before.params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(after.opt_state), before.opt_state)
