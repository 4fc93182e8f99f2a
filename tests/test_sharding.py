"""Sharded forward / gradient / train step equal the single-device result; clear mesh errors."""

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


def mesh_cfg(data, tensor, seq):
  return ml_collections.ConfigDict(dict(data=data, tensor=tensor, sequence=seq))


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
    ((8, 1, 1), False),
    ((2, 4, 1), False),
    ((2, 2, 2), False),
    ((4, 2, 1), True),
    ((2, 2, 2), True),
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

  # The layout is what the rules say: heads over tensor, embed over data and the
  # context-parallel ranks only with FSDP.
  embed = ('data', 'sequence') if fsdp else None
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


def run_steps(mesh_shape, fsdp, accum_steps=1, steps=2, devices=None):
  tx, schedule, boxed = optimizer()
  mesh = sharding.make_mesh(mesh_cfg(*mesh_shape), devices)
  _, state_sharding = train_step.state_shardings(mesh, tx, boxed, fsdp)
  batch_sharding = sharding.batch_sharding(mesh, (BATCH, LENGTH), fsdp)
  with sharding.activate(mesh, fsdp):
    state = jax.jit(train_step.make_init_fn(MODEL, tx, LENGTH), out_shardings=state_sharding)(
      jax.random.key(0)
    )
    step = jax.jit(
      train_step.make_train_step(MODEL, tx, schedule, accum_steps),
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, None),
      donate_argnums=0,
    )
    losses = []
    for i in range(steps):
      state, metrics = step(state, jax.device_put(make_batch(i), batch_sharding))
      losses.append(float(metrics['loss']))
  return losses, jax.device_get(state.params)


def test_train_steps_match_across_meshes_and_accumulation():
  """Two full steps (with AdamW and its sharded state) equal the single-device steps."""
  ref_losses, ref_params = run_steps((1, 1, 1), fsdp=False, devices=jax.devices()[:1])
  for shape, fsdp, accum in [((2, 2, 2), True, 1), ((2, 4, 1), False, 2), ((8, 1, 1), True, 4)]:
    losses, params = run_steps(shape, fsdp, accum)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # Adam divides by sqrt(v): near-zero gradients amplify rounding, so compare against the
    # step size (lr 1e-2): 1e-5 is 0.1% of one update.
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), params, ref_params
    )


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
