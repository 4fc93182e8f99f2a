"""The model against HF transformers (fp32), causality, document masks, remat, param counts."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax.model import config as model_config
from k2jax.model.transformer import Transformer
from k2jax.training import train_step
from tests.helpers import TINY, hf_llama, hf_to_params, require_oracle


def init_params(cfg, seed=0, length=16):
  tokens = jnp.zeros((1, length), jnp.int32)
  init = jax.jit(lambda key: nn.unbox(Transformer(cfg).init(key, tokens)['params']))
  return init(jax.random.key(seed))


@pytest.mark.parametrize('num_kv_heads,rope_base', [(4, 1e4), (2, 5e5), (1, 1e7)])
def test_logits_match_hf_llama(num_kv_heads, rope_base):
  torch = require_oracle('torch')
  cfg = dataclasses.replace(TINY, num_kv_heads=num_kv_heads, rope_base=rope_base)
  hf_model = hf_llama(cfg)
  with torch.no_grad():  # non-trivial norm weights, so the (1+w) mapping is exercised
    for name, p in hf_model.named_parameters():
      if 'norm' in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24))
  with torch.no_grad():
    expected = hf_model(torch.tensor(tokens)).logits.numpy()
  params = hf_to_params(hf_model, cfg)
  got = Transformer(cfg).apply({'params': params}, jnp.asarray(tokens, jnp.int32))
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)


def _embedding_grad_per_position(cfg, tokens, segment_ids, loss_position):
  """d loss(position t) / d embedding row of each input position (tokens are distinct)."""
  params = init_params(cfg)
  model = Transformer(cfg)
  tokens = jnp.asarray(tokens)[None]
  segment_ids = jnp.asarray(segment_ids)[None]

  def loss(p):
    logits = model.apply({'params': p}, tokens, None, segment_ids)
    return jax.nn.log_softmax(logits[0, loss_position])[3]

  grads = jax.jit(jax.grad(loss))(params)['embedding']
  return np.abs(np.asarray(grads)[np.asarray(tokens[0])]).sum(-1)


def test_causal():
  length, t = 12, 5
  tokens = np.arange(10, 10 + length)  # distinct ids: an embedding row = one position
  norms = _embedding_grad_per_position(TINY, tokens, np.ones(length, np.int32), t)
  assert np.all(norms[t + 1 :] == 0.0), norms
  assert np.all(norms[: t + 1] > 0.0), norms


def test_documents_do_not_attend_to_each_other():
  length, t = 12, 9
  tokens = np.arange(10, 10 + length)
  segments = np.array([1] * 6 + [2] * 6, np.int32)
  norms = _embedding_grad_per_position(TINY, tokens, segments, t)
  assert np.all(norms[:6] == 0.0), norms  # the earlier document is invisible
  assert np.all(norms[6 : t + 1] > 0.0) and np.all(norms[t + 1 :] == 0.0), norms


def test_rope_positions_restart_per_document():
  """A document's logits do not depend on where it sits in a packed row."""
  model = Transformer(TINY)
  params = init_params(TINY)
  doc = jnp.arange(20, 28)[None]
  apply = jax.jit(model.apply)
  alone = apply({'params': params}, doc)
  packed = jnp.concatenate([jnp.arange(40, 45)[None], doc], axis=1)
  positions = jnp.concatenate([jnp.arange(5), jnp.arange(8)])[None]
  segments = jnp.array([[1] * 5 + [2] * 8])
  both = apply({'params': params}, packed, positions, segments)
  np.testing.assert_allclose(np.asarray(both[:, 5:]), np.asarray(alone), atol=1e-5)


@pytest.mark.parametrize('policy', ['full', 'save_dots'])
def test_remat_matches_no_remat(policy):
  batch = {
    'inputs': jnp.asarray(np.random.default_rng(1).integers(0, 128, (2, 16)), jnp.int32),
    'targets': jnp.asarray(np.random.default_rng(2).integers(0, 128, (2, 16)), jnp.int32),
    'positions': jnp.broadcast_to(jnp.arange(16), (2, 16)),
    'segment_ids': jnp.ones((2, 16), jnp.int32),
    'loss_mask': jnp.ones((2, 16), jnp.float32),
  }
  params = init_params(TINY)

  def loss_grads(cfg):
    fn = jax.jit(lambda p: train_step.loss_and_grads(Transformer(cfg), p, batch, accum_steps=1))
    return fn(params)[:2]

  ref_loss, ref_grads = loss_grads(TINY)
  loss, grads = loss_grads(dataclasses.replace(TINY, remat=policy))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads
  )


def test_initialisation_follows_k2v2():
  cfg = dataclasses.replace(
    TINY,
    num_layers=4,
    hidden_size=256,
    ffn_size=512,
    num_heads=8,
    num_kv_heads=4,
    head_dim=32,
    vocab_size=512,
  )
  params = init_params(cfg)
  out_std = 0.01 / np.sqrt(2 * 4)
  assert np.std(params['layers']['attention']['o']) == pytest.approx(out_std, rel=0.05)
  assert np.std(params['layers']['mlp']['down']) == pytest.approx(out_std, rel=0.05)
  for w in (
    params['embedding'],
    params['output'],
    params['layers']['attention']['q'],
    params['layers']['mlp']['gate'],
  ):
    assert np.std(w) == pytest.approx(0.01, rel=0.05)
  assert np.all(params['final_norm']['scale'] == 0.0)  # (1+w) form starts at w = 0


def test_param_counts():
  debug = model_config.ModelConfig(**model_config.PRESETS['debug'])
  params = init_params(debug)
  assert sum(x.size for x in jax.tree.leaves(params)) == debug.param_count()
  # docs/recipe.md: 80 x (2 x 8192 x 128 x (64 + 8) + 3 x 8192 x 28672 + 2 x 8192) + 8192
  #          + 2 x 250112 x 8192 ≈ 72.5B, 68.5B without embeddings.
  k2 = model_config.ModelConfig(**model_config.PRESETS['k2v2_70b'])
  per_layer = 2 * 8192 * 128 * (64 + 8) + 3 * 8192 * 28672 + 2 * 8192
  assert k2.param_count() == 80 * per_layer + 8192 + 2 * 250112 * 8192 == 72_550_195_200
  assert k2.param_count(include_embeddings=False) == 68_452_360_192
  abstract = train_step.abstract_params(Transformer(k2), seq_len=8)  # shapes only
  assert (
    sum(
      np.prod(x.value.shape)
      for x in jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    )
    == k2.param_count()
  )
  assert k2.flops_per_token(8192) == pytest.approx(455e9, rel=0.01)


def test_bad_model_config_is_a_clear_error():
  with pytest.raises(ValueError, match='num_heads=6 is not a multiple of model.num_kv_heads=4'):
    dataclasses.replace(TINY, num_heads=6, num_kv_heads=4)
  with pytest.raises(ValueError, match='model.remat'):
    dataclasses.replace(TINY, remat='sometimes')
