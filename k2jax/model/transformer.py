"""The K2-V2 decoder: embeddings, scanned pre-norm blocks, final norm, untied output head.

Layers are stacked with `nn.scan`, so every block parameter has a leading `layers` axis and
compile time does not grow with depth. Remat wraps the block inside the scan.

Decoding (k2jax/infer/generation.py) passes a KV cache from `init_cache`: K/V of every layer in one
array with a leading `layers` axis, carried through the same scan (each layer writes its
slice in place), plus each slot's segment id (0: empty or padding) and the next write slot.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from k2jax.model.attention import CACHE_AXES, Attention
from k2jax.model.config import ModelConfig
from k2jax.model.layers import MLP, RMSNorm, constrain, dense, weight

RESIDUAL = ('activation_batch', 'activation_residual_length', 'activation_embed')
# Decoding feeds a token at a time: its length cannot be split over `tensor`.
DECODE_RESIDUAL = ('activation_batch', 'activation_length', 'activation_embed')


class Block(nn.Module):
  """x + attention(norm(x)), then x + mlp(norm(x)).

  Training: the scan's carry is x. Decoding: the carry is (x, cache) and `layer` is this
  block's index into the cache (scanned over jnp.arange(num_layers)).
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, carry, positions_BxL, segment_ids_BxL, layer=None):
    decoding = layer is not None
    x_BxLxE, cache = carry if decoding else (carry, None)
    axes = DECODE_RESIDUAL if decoding else RESIDUAL
    x_BxLxE = constrain(x_BxLxE, axes)
    attn = Attention(self.cfg, name='attention')(
      RMSNorm(self.cfg, name='attention_norm')(x_BxLxE),
      positions_BxL,
      segment_ids_BxL,
      cache,
      layer,
    )
    if decoding:
      attn, cache = attn
    x_BxLxE = constrain(x_BxLxE + attn.astype(x_BxLxE.dtype), axes)
    mlp = MLP(self.cfg, name='mlp')(RMSNorm(self.cfg, name='mlp_norm')(x_BxLxE))
    x_BxLxE = constrain(x_BxLxE + mlp.astype(x_BxLxE.dtype), axes)
    return ((x_BxLxE, cache) if decoding else x_BxLxE), None  # (carry, per-layer output)


REMAT_POLICY = {
  'full': jax.checkpoint_policies.nothing_saveable,  # recompute the whole block (K2-V2's choice)
  # Keep the weight matmuls' outputs, recompute the rest (elementwise, attention softmax).
  'save_dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_block(cfg: ModelConfig):
  if cfg.remat == 'none':
    return Block
  # prevent_cse=False is safe and faster inside scan (the loop already blocks CSE).
  return nn.remat(Block, policy=REMAT_POLICY[cfg.remat], prevent_cse=False)


def init_cache(cfg: ModelConfig, batch: int, length: int) -> dict:
  """An empty KV cache of `length` slots per row, in the compute dtype.

  k, v: [layers, batch, length, kv heads, head dim]; segment_ids: [batch, length], 0 for
  slots that hold nothing or padding; index: the slot the next chunk is written at.
  """
  shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
  return {
    'k': constrain(jnp.zeros(shape, cfg.compute_dtype), CACHE_AXES),
    'v': constrain(jnp.zeros(shape, cfg.compute_dtype), CACHE_AXES),
    'segment_ids': constrain(
      jnp.zeros((batch, length), jnp.int32), ('activation_batch', 'activation_length')
    ),
    'index': jnp.zeros((), jnp.int32),
  }


class Transformer(nn.Module):
  """tokens [B, L] -> logits [B, L, V] (float32).

  With `cache` (from init_cache) the L tokens are a chunk written at cache slots
  `cache['index']` onwards (a prompt, then one token at a time) and the call returns
  (logits, updated cache); positions then default to the slot numbers. Segment id 0 marks
  padding. `logits_at` [B] picks one position per row to compute logits for ([B, 1, V]),
  which spares the [B, L, V] logits of a long prompt.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(
    self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, cache=None, logits_at=None
  ):
    cfg = self.cfg
    first = 0 if cache is None else cache['index']
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(first + jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones_like(tokens_BxL)

    embedding_VxE = weight(
      self,
      'embedding',
      (cfg.vocab_size, cfg.hidden_size),
      ('vocab', 'embed'),
      cfg.init_std,
      cfg.weight_dtype,
    )
    x_BxLxE = jnp.take(embedding_VxE, tokens_BxL, axis=0).astype(cfg.compute_dtype)
    x_BxLxE = constrain(x_BxLxE, RESIDUAL if cache is None else DECODE_RESIDUAL)

    def scan(in_axes):
      return nn.scan(
        remat_block(cfg),
        variable_axes={'params': 0},
        split_rngs={'params': True},
        in_axes=in_axes,
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: 'layers'},
      )(cfg, name='layers')

    if cache is None:
      blocks = scan((nn.broadcast, nn.broadcast))
      x_BxLxE, _ = blocks(x_BxLxE, positions_BxL, segment_ids_BxL)
    else:
      cache = dict(cache)
      cache['segment_ids'] = jax.lax.dynamic_update_slice(
        cache['segment_ids'], segment_ids_BxL.astype(jnp.int32), (0, first)
      )
      # The layer index is scanned; the cache rides in the carry, so each layer's K/V
      # update is in place rather than a per-layer copy of the cache.
      blocks = scan((nn.broadcast, nn.broadcast, 0))
      (x_BxLxE, cache), _ = blocks(
        (x_BxLxE, cache), positions_BxL, segment_ids_BxL, jnp.arange(cfg.num_layers)
      )
      cache['index'] = first + tokens_BxL.shape[1]

    if logits_at is not None:
      x_BxLxE = jnp.take_along_axis(x_BxLxE, logits_at[:, None, None], axis=1)
    x_BxLxE = RMSNorm(cfg, name='final_norm')(x_BxLxE)
    head_ExV = weight(
      self,
      'output',
      (cfg.hidden_size, cfg.vocab_size),
      ('embed', 'vocab'),
      cfg.init_std,
      cfg.weight_dtype,
    )
    [logits_BxLxV] = dense(x_BxLxE, head_ExV.astype(cfg.compute_dtype))
    logits_BxLxV = constrain(
      logits_BxLxV, ('activation_batch', 'activation_length', 'activation_vocab')
    )
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    return logits_BxLxV if cache is None else (logits_BxLxV, cache)
