"""Tests for k2jax.optim: schedules, decay mask, AdamW math, clipping, checks."""

import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from k2jax.training import optim

PEAK, FLOOR = 3e-4, 3e-5


def make_cfg(**overrides):
  cfg = ml_collections.ConfigDict(
    dict(
      peak_lr=PEAK,
      min_lr=FLOOR,
      warmup_steps=10,
      schedule='cosine',
      decay_steps=0,
      wsd_decay_fraction=0.1,
      wsd_decay_shape='linear',
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.05,
      clip_norm=1.0,
    )
  )
  cfg.update(overrides)
  return cfg


def lr_at(cfg, total_steps, step):
  return optim.learning_rate_at(cfg, total_steps, step)


# --- schedules ---------------------------------------------------------------


def test_warmup_is_linear_from_zero():
  for kind in optim.SCHEDULES:
    cfg = make_cfg(schedule=kind)
    assert lr_at(cfg, 110, 0) == 0.0
    assert lr_at(cfg, 110, 5) == pytest.approx(PEAK / 2, rel=1e-6)
    assert lr_at(cfg, 110, 10) == pytest.approx(PEAK, rel=1e-6)


def test_cosine_midpoint_end_and_floor():
  cfg = make_cfg()  # warmup 10, decay over the remaining 100 steps
  assert lr_at(cfg, 110, 60) == pytest.approx((PEAK + FLOOR) / 2, rel=1e-6)
  # Quarter way: cos(pi/4) = sqrt(2)/2.
  quarter = FLOOR + (PEAK - FLOOR) * 0.5 * (1 + math.sqrt(2) / 2)
  assert lr_at(cfg, 110, 35) == pytest.approx(quarter, rel=1e-6)
  assert lr_at(cfg, 110, 110) == pytest.approx(FLOOR, rel=1e-6)
  assert lr_at(cfg, 110, 500) == pytest.approx(FLOOR, rel=1e-6)


def test_cosine_explicit_decay_steps_then_floor():
  cfg = make_cfg(decay_steps=40)  # floor reached at step 50, long before 110
  assert lr_at(cfg, 110, 30) == pytest.approx((PEAK + FLOOR) / 2, rel=1e-6)
  assert lr_at(cfg, 110, 50) == pytest.approx(FLOOR, rel=1e-6)
  assert lr_at(cfg, 110, 80) == pytest.approx(FLOOR, rel=1e-6)


def test_constant_ignores_min_lr():
  cfg = make_cfg(schedule='constant')
  for step in (10, 50, 110, 10_000):
    assert lr_at(cfg, 110, step) == pytest.approx(PEAK, rel=1e-6)


def test_no_warmup_starts_at_peak():
  for kind in optim.SCHEDULES:
    assert lr_at(make_cfg(schedule=kind, warmup_steps=0), 100, 0) == (pytest.approx(PEAK, rel=1e-6))


@pytest.mark.parametrize(
  'shape, half_way', [('linear', 0.5), ('cosine', 0.5), ('sqrt', 1 - math.sqrt(0.5))]
)
def test_wsd_stable_then_decay(shape, half_way):
  # total 200, fraction 0.1: stable until 180, decay over steps 180..200.
  cfg = make_cfg(schedule='wsd', wsd_decay_shape=shape)
  for step in (10, 100, 180):
    assert lr_at(cfg, 200, step) == pytest.approx(PEAK, rel=1e-6)
  expected_mid = FLOOR + (PEAK - FLOOR) * half_way
  assert lr_at(cfg, 200, 190) == pytest.approx(expected_mid, rel=1e-6)
  assert lr_at(cfg, 200, 199) < lr_at(cfg, 200, 190)
  assert lr_at(cfg, 200, 200) == pytest.approx(FLOOR, rel=1e-6)
  assert lr_at(cfg, 200, 300) == pytest.approx(FLOOR, rel=1e-6)


def test_schedule_works_under_jit_with_int_steps():
  schedule = optim.make_schedule(make_cfg(), 110)
  steps = jnp.arange(0, 120, dtype=jnp.int32)
  traced = jax.jit(jax.vmap(schedule))(steps)
  eager = np.array([lr_at(make_cfg(), 110, int(s)) for s in steps])
  np.testing.assert_allclose(np.asarray(traced), eager, rtol=1e-6)


# --- decay mask --------------------------------------------------------------


def test_decay_mask_by_ndim():
  params = {
    'norm': {'scale': jnp.ones(4)},
    'dense': {'kernel': jnp.ones((4, 3)), 'bias': jnp.zeros(3)},
    'embed': jax.ShapeDtypeStruct((10, 4), jnp.float32),
  }
  assert optim.decay_mask(params) == {
    'norm': {'scale': False},
    'dense': {'kernel': True, 'bias': False},
    'embed': True,
  }


def test_zero_grads_only_decay_matrices():
  cfg = make_cfg(schedule='constant', warmup_steps=0, weight_decay=0.1)
  params = {'scale': jnp.array([1.0, -2.0, 3.0]), 'kernel': jnp.array([[1.0, -2.0], [0.5, 4.0]])}
  tx = optim.make_optimizer(cfg, total_steps=10)
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new_params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new_params['scale'], params['scale'])
  expected_kernel = params['kernel'] * (1 - PEAK * 0.1)
  np.testing.assert_allclose(new_params['kernel'], expected_kernel, rtol=1e-7)


# --- AdamW math --------------------------------------------------------------


def numpy_adamw(params, grads_per_step, lr_per_step, b1, b2, eps, wd):
  """Textbook AdamW (decoupled decay scaled by lr, decay on ndim >= 2)."""
  params = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(p) for k, p in params.items()}
  for t, (grads, lr) in enumerate(zip(grads_per_step, lr_per_step), start=1):
    for k in params:
      g = grads[k].astype(np.float64)
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      m_hat = m[k] / (1 - b1**t)
      v_hat = v[k] / (1 - b2**t)
      decay = wd * params[k] if params[k].ndim >= 2 else 0.0
      params[k] = params[k] - lr * (m_hat / (np.sqrt(v_hat) + eps) + decay)
  return params


def test_adamw_matches_numpy_reference():
  # No clipping and tiny gradients so eps visibly matters; warmup so the
  # learning rate changes between steps (steps 0..2 use lr 0, peak/4, peak/2).
  cfg = make_cfg(warmup_steps=4, clip_norm=0.0, eps=1e-3)
  rng = np.random.default_rng(0)
  params = {
    'kernel': rng.normal(size=(3, 4)).astype(np.float32),
    'bias': rng.normal(size=(4,)).astype(np.float32),
  }
  grads_per_step = [
    {k: (1e-3 * rng.normal(size=p.shape)).astype(np.float32) for k, p in params.items()}
    for _ in range(3)
  ]

  tx = optim.make_optimizer(cfg, total_steps=20)
  state = tx.init(params)
  jax_params = jax.tree.map(jnp.asarray, params)
  for grads in grads_per_step:
    updates, state = jax.jit(tx.update)(grads, state, jax_params)
    jax_params = optax.apply_updates(jax_params, updates)

  lrs = [lr_at(cfg, 20, step) for step in range(3)]
  assert lrs == pytest.approx([0.0, PEAK / 4, PEAK / 2], rel=1e-6)
  expected = numpy_adamw(params, grads_per_step, lrs, cfg.b1, cfg.b2, cfg.eps, cfg.weight_decay)
  for k in params:
    assert jax_params[k].dtype == jnp.float32
    np.testing.assert_allclose(jax_params[k], expected[k], rtol=1e-6, atol=1e-7)
    # The step must actually have moved the params (not a vacuous check).
    assert not np.allclose(jax_params[k], params[k], rtol=0, atol=1e-6)


# --- clipping ----------------------------------------------------------------


def test_clipping_scales_large_gradients_to_clip_norm():
  cfg = make_cfg(clip_norm=1.0)
  grads = {'a': jnp.array([3.0, 0.0]), 'b': jnp.array([[0.0, 4.0]])}  # norm 5
  clip = optax.clip_by_global_norm(cfg.clip_norm)
  clipped, _ = clip.update(grads, clip.init(grads))
  np.testing.assert_allclose(clipped['a'], [0.6, 0.0], rtol=1e-6)
  np.testing.assert_allclose(clipped['b'], [[0.0, 0.8]], rtol=1e-6)
  assert float(optax.tree.norm(clipped)) == pytest.approx(1.0, rel=1e-6)


def test_optimizer_clips_before_adam():
  """With clipping, grads g and 10*g (both above clip_norm) give the same
  Adam moments; without clipping, the first moment scales with the grads."""
  params = {'w': jnp.ones((2, 2))}
  small = {'w': jnp.full((2, 2), 2.0)}  # global norm 4 > 1
  big = {'w': jnp.full((2, 2), 20.0)}

  def first_moment(cfg, grads):
    tx = optim.make_optimizer(cfg, total_steps=10)
    _, state = tx.update(grads, tx.init(params), params)
    adam_state = [
      s
      for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
      if isinstance(s, optax.ScaleByAdamState)
    ][0]
    return np.asarray(adam_state.mu['w'])

  clipped = make_cfg(clip_norm=1.0)
  np.testing.assert_allclose(first_moment(clipped, small), first_moment(clipped, big), rtol=1e-6)
  # Clipped grads are 0.5 each (norm 1 over 4 entries); mu = (1 - b1) * g.
  np.testing.assert_allclose(first_moment(clipped, small), np.full((2, 2), 0.1 * 0.5), rtol=1e-6)

  for off in (0.0, None):
    unclipped = make_cfg(clip_norm=off)
    np.testing.assert_allclose(first_moment(unclipped, big), np.full((2, 2), 0.1 * 20.0), rtol=1e-6)


# --- validation --------------------------------------------------------------


@pytest.mark.parametrize(
  'overrides, total_steps, message',
  [
    (dict(schedule='cosin'), 100, "optim.schedule='cosin' is not one of cosine|constant|wsd"),
    (dict(min_lr=1e-3), 100, 'optim.min_lr=0.001 must be <= optim.peak_lr'),
    (dict(min_lr=-1e-6), 100, 'optim.min_lr=-1e-06 must be >= 0'),
    (dict(peak_lr=0.0), 100, 'optim.peak_lr=0.0 must be positive'),
    (dict(warmup_steps=-1), 100, 'optim.warmup_steps=-1 must be >= 0'),
    (
      dict(warmup_steps=200),
      100,
      "optim.warmup_steps=200 exceeds total_steps=100 for schedule='cosine'",
    ),
    (
      dict(schedule='wsd', warmup_steps=200),
      100,
      "optim.warmup_steps=200 exceeds total_steps=100 for schedule='wsd'",
    ),
    (
      dict(schedule='wsd', warmup_steps=95),
      100,
      'optim.warmup_steps=95 overlaps the wsd decay phase',
    ),
    (
      dict(schedule='wsd', wsd_decay_shape='exp'),
      100,
      "optim.wsd_decay_shape='exp' is not one of linear|cosine|sqrt",
    ),
    (
      dict(schedule='wsd', wsd_decay_fraction=1.5),
      100,
      'optim.wsd_decay_fraction=1.5 must be in (0, 1]',
    ),
    (dict(decay_steps=-5), 100, 'optim.decay_steps=-5 must be >= 0'),
    (dict(b2=1.0), 100, 'optim.b2=1.0 must be in [0, 1)'),
    (dict(weight_decay=-0.1), 100, 'optim.weight_decay=-0.1 must be >= 0'),
    (dict(clip_norm=-1.0), 100, 'optim.clip_norm=-1.0 must be >= 0'),
    ({}, 0, 'total_steps=0 must be positive'),
  ],
)
def test_validation_errors(overrides, total_steps, message):
  cfg = make_cfg(**overrides)
  with pytest.raises(ValueError, match=re.escape(message)):
    optim.make_schedule(cfg, total_steps)
  with pytest.raises(ValueError, match=re.escape(message)):
    optim.make_optimizer(cfg, total_steps)


def test_constant_allows_warmup_longer_than_run():
  cfg = make_cfg(schedule='constant', warmup_steps=200)
  assert lr_at(cfg, 100, 100) == pytest.approx(PEAK / 2, rel=1e-6)


def test_optional_fields_default_when_missing():
  cfg = ml_collections.ConfigDict(
    dict(
      peak_lr=PEAK,
      min_lr=FLOOR,
      warmup_steps=0,
      schedule='wsd',
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.05,
    )
  )
  # Defaults: fraction 0.1 linear decay, decay_steps 0, clipping off.
  assert lr_at(cfg, 100, 95) == pytest.approx((PEAK + FLOOR) / 2, rel=1e-6)
  optim.make_optimizer(cfg, 100)


@pytest.mark.parametrize(
  'overrides, reads_total_steps',
  [
    (dict(schedule='cosine'), True),  # decays to the end of the stage
    (dict(schedule='cosine', decay_steps=50), False),  # its own decay length
    (dict(schedule='constant'), False),
    (dict(schedule='wsd'), True),
  ],
)
def test_schedule_keys_are_the_fields_the_schedule_reads(overrides, reads_total_steps):
  """What a resumed run compares: a key listed here changes the rates when it changes."""
  cfg = make_cfg(**overrides)
  keys = optim.schedule_keys(cfg)
  assert ('total_steps' in keys) == reads_total_steps
  for key in keys:  # each listed key does move the schedule somewhere
    if key in ('optim.schedule', 'total_steps'):
      continue
    field = key.split('.', 1)[1]
    value = cfg[field]
    other = 'sqrt' if field == 'wsd_decay_shape' else (value * 2 or 50)
    changed = make_cfg(**{**overrides, field: other})
    assert any(lr_at(cfg, 200, s) != lr_at(changed, 200, s) for s in range(200)), key
  if not reads_total_steps:
    assert all(lr_at(cfg, 200, s) == lr_at(cfg, 300, s) for s in range(0, 200, 7))


def test_schedule_count_lags_the_step_after_a_skipped_update():
  cfg = make_cfg(warmup_steps=4)
  tx = optim.make_optimizer(cfg, 20)
  params = {'w': jnp.ones((2, 2))}
  state = tx.init(params)
  _, state = tx.update({'w': jnp.ones((2, 2))}, state, params)
  assert int(optim.schedule_count(state)) == 1
  with pytest.raises(ValueError, match='one scheduled learning rate'):
    optim.schedule_count(optax.sgd(0.1).init(params))
