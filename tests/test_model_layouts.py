"""The CPU fast paths of the model: flattened token matmuls and the dense attention's backward."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from k2jax.model.kernels.reference import dense_attention, visible
from k2jax.model.transformer import Transformer
from k2jax.parallel import sharding
from k2jax.training import train_step
from tests.helpers import TINY, random_params


def autodiff_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
  """The contract written plainly, differentiated by JAX."""
  batch, length, heads, dim = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(batch, length, kv_heads, heads // kv_heads, dim)
  scores = jnp.einsum('btkgd,bskd->bkgts', q, k) * dim**-0.5
  mask = visible(q_pos, kv_pos, q_seg, kv_seg)[:, None, None]
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)
  return jnp.einsum('bkgts,bskd->btkgd', probs, v).reshape(batch, length, heads, dim)


@pytest.mark.parametrize(
  'heads,kv_heads,length,slots,offset', [(8, 2, 16, 16, 0), (6, 3, 5, 12, 7)]
)
def test_dense_attention_gradient_equals_autodiff(heads, kv_heads, length, slots, offset):
  rng = np.random.default_rng(0)
  q, dout = (rng.normal(size=(2, length, heads, 8)).astype(np.float32) for _ in range(2))
  k, v = (rng.normal(size=(2, slots, kv_heads, 8)).astype(np.float32) for _ in range(2))
  q_pos = np.broadcast_to(np.arange(length) + offset, (2, length))
  kv_pos = np.broadcast_to(np.arange(slots), (2, slots))
  q_seg = np.ones((2, length), np.int32)
  kv_seg = np.ones((2, slots), np.int32)
  kv_seg[:, slots // 2 :] = 2  # two documents
  q_seg[1, 0] = 3  # a query that sees no key: zeros, zero gradient
  ints = tuple(jnp.asarray(x) for x in (q_pos, kv_pos, q_seg, kv_seg))

  def out_and_grads(attend):
    def loss(q, k, v):
      return jnp.sum(attend(q, k, v, *ints) * dout)

    return attend(q, k, v, *ints), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  out, grads = out_and_grads(dense_attention)
  want_out, want_grads = out_and_grads(autodiff_attention)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
  assert not np.any(out[1, 0]) and not np.any(grads[0][1, 0])
  for name, grad, want in zip('qkv', grads, want_grads):
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-5, err_msg=f'd{name}')


@pytest.mark.parametrize(
  'shape,flat', [(None, True), ((8, 1, 1), True), ((4, 2, 1), False), ((4, 1, 2), False)]
)
def test_tokens_flatten_only_where_no_mesh_axis_splits_the_length(shape, flat):
  if shape is None:
    assert sharding.splits_length() is not flat
    return
  mesh_cfg = ml_collections.ConfigDict(dict(zip(sharding.AXES, shape)))
  with sharding.activate(sharding.make_mesh(mesh_cfg), False):
    assert sharding.splits_length() is not flat


def test_flattened_and_unflattened_matmuls_agree(monkeypatch):
  rng = np.random.default_rng(1)
  batch = {
    'inputs': jnp.asarray(rng.integers(0, TINY.vocab_size, (2, 12)), jnp.int32),
    'targets': jnp.asarray(rng.integers(0, TINY.vocab_size, (2, 12)), jnp.int32),
    'positions': jnp.broadcast_to(jnp.arange(12), (2, 12)),
    'segment_ids': jnp.ones((2, 12), jnp.int32),
    'loss_mask': jnp.ones((2, 12), jnp.float32),
  }
  params = random_params(TINY)
  model = Transformer(TINY)

  def logits_loss_grads(flat):
    monkeypatch.setattr(sharding, 'splits_length', lambda: not flat)
    logits = model.apply({'params': params}, batch['inputs'])
    return logits, *train_step.loss_and_grads(model, params, batch, accum_steps=1)[:2]

  flat, nested = logits_loss_grads(True), logits_loss_grads(False)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), flat, nested)
