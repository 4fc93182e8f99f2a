"""The K2-V2 decoder: embeddings, scanned pre-norm blocks, final norm, untied output head.

Layers are stacked with `nn.scan`, so every block parameter has a leading `layers` axis and
compile time does not grow with depth. Remat wraps the block inside the scan; its policy
(`model.remat`) picks what the backward pass keeps among the activations the block names.

Training computes the loss from the final hidden states and the head with
`cross_entropy_sum`, a chunk of positions at a time, so the [B, L, V] logits are never whole.

Decoding (k2jax/infer/generation.py) passes a KV cache from `init_cache`: K/V of every layer in one
array with a leading `layers` axis, carried through the same scan (each layer writes its
slice in place), plus each slot's segment id (0: empty or padding) and the next write slot.
"""

import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from k2jax.model.attention import CACHE_AXES, Attention
from k2jax.model.config import ModelConfig
from k2jax.model.layers import MLP, RMSNorm, constrain, dense, weight
from k2jax.parallel import sharding

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
    # Every use below goes through the name, so a policy that offloads it leaves no copy of
    # the input on the device.
    x_BxLxE = checkpoint_name(constrain(x_BxLxE, axes), 'block_input')
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


_policies = jax.checkpoint_policies
# Activations a policy keeps in host memory ('pinned_host'), copied back for the backward pass.
OFFLOADED = {'offload_block_input': ('block_input',)}


def _offload(*names):
  return _policies.save_and_offload_only_these_names(
    names_which_can_be_saved=(),
    names_which_can_be_offloaded=names,
    offload_src='device',
    offload_dst='pinned_host',
  )


# model.remat -> what a block keeps for its backward pass (besides its input); the rest is
# recomputed. Names: the block's input 'block_input'; the q / k (after rotary) / v projections
# 'query_proj', 'key_proj', 'value_proj'; the attention backend's output 'attention_out' and,
# for `blockwise` and `pallas`, its log-sum-exp 'attention_lse': with both kept, the backward
# pass does not rerun the attention forward (the dense `xla` reruns it for its probabilities,
# `cudnn` always does).
REMAT_POLICY = {
  'full': _policies.nothing_saveable,  # recompute the whole block (K2-V2's choice)
  # Keep the weight matmuls' outputs, recompute the rest (elementwise, attention softmax).
  'save_dots': _policies.dots_with_no_batch_dims_saveable,
  # Recompute the norms, the output projection and the MLP, not the q/k/v projections.
  'save_qkv_attn': _policies.save_only_these_names(
    'query_proj', 'key_proj', 'value_proj', 'attention_out', 'attention_lse'
  ),
  # Recompute all but the attention core, the costliest part at long context.
  'save_attn': _policies.save_only_these_names('attention_out', 'attention_lse'),
  **{name: _offload(*names) for name, names in OFFLOADED.items()},
}


@functools.cache
def _log_no_host_memory(policy: str, platform: str):
  logging.getLogger(__name__).warning(
    'model.remat=%r: the %s platform has no host memory apart from its device memory, so the '
    'activations it would offload (%s) stay on the device instead',
    policy,
    platform,
    ', '.join(OFFLOADED[policy]),
  )


def remat_block(cfg: ModelConfig):
  if cfg.remat == 'none':
    return Block
  policy = REMAT_POLICY[cfg.remat]
  platform = jax.default_backend()
  if cfg.remat in OFFLOADED and platform == 'cpu':  # XLA:CPU would drop the offload silently
    _log_no_host_memory(cfg.remat, platform)
    policy = _policies.save_only_these_names(*OFFLOADED[cfg.remat])
  # prevent_cse=False is safe and faster inside scan (the loop already blocks CSE).
  return nn.remat(Block, policy=policy, prevent_cse=False)


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
  which spares the [B, L, V] logits of a long prompt. `hidden=True` (training) returns
  (final hidden states [B, L, E] in the compute dtype, output head [E, V]) instead of logits,
  for `cross_entropy_sum`.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(
    self,
    tokens_BxL,
    positions_BxL=None,
    segment_ids_BxL=None,
    cache=None,
    logits_at=None,
    hidden=False,
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
    # Looked up in the master dtype: its gradient, a scatter-add over tokens, stays fp32. The
    # constraint transposes to one on that gradient, which otherwise comes out whole
    # ([vocab, embed] fp32, 7.6 GiB at K2-V2's size) on every device.
    embedding_VxE = constrain(embedding_VxE, ('vocab', 'embed'))
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
      HEAD,
      cfg.init_std,
      cfg.weight_dtype,
      cfg.compute_dtype,
    )
    if hidden:
      return x_BxLxE, head_ExV
    [logits_BxLxV] = dense(x_BxLxE, head_ExV)
    logits_BxLxV = constrain(logits_BxLxV, LOGITS).astype(jnp.float32)
    return logits_BxLxV if cache is None else (logits_BxLxV, cache)


LOGITS = ('activation_batch', 'activation_length', 'activation_vocab')
HIDDEN = ('activation_batch', 'activation_length', 'activation_embed')
HEAD = ('embed', 'vocab')  # the output head parameter's axes


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def cross_entropy_sum(hidden_BxLxE, head_ExV, targets_BxL, mask_BxL, chunk: int):
  """sum(mask * cross-entropy(hidden @ head, targets)) in float32, computed `chunk` positions of
  each row at a time: only one chunk's logits [B, chunk, V] (float32) ever exist.

  The gradient is computed along with the loss, chunk by chunk, with the three head matmuls
  of plain autodiff; the backward pass only scales d hidden [B, L, E] and d head [E, V] by the
  incoming cotangent, so it keeps no logits. Targets and mask get no gradient.
  """
  return _cross_entropy_chunks(hidden_BxLxE, head_ExV, targets_BxL, mask_BxL, chunk, False)[0]


def _cross_entropy_fwd(hidden_BxLxE, head_ExV, targets_BxL, mask_BxL, chunk):
  loss, dhidden_BxLxE, dhead_ExV = _cross_entropy_chunks(
    hidden_BxLxE, head_ExV, targets_BxL, mask_BxL, chunk, True
  )
  return loss, (dhidden_BxLxE, dhead_ExV)


def _cross_entropy_bwd(chunk, residuals, dloss):
  dhidden_BxLxE, dhead_ExV = residuals
  return (dhidden_BxLxE * dloss).astype(dhidden_BxLxE.dtype), dhead_ExV * dloss, None, None


cross_entropy_sum.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def _cross_entropy_chunks(hidden_BxLxE, head_ExV, targets_BxL, mask_BxL, chunk, grads):
  """(loss sum, d loss / d hidden, d loss / d head); the gradients None unless `grads`."""
  B, L, E = hidden_BxLxE.shape
  V = head_ExV.shape[1]
  dtype = hidden_BxLxE.dtype
  n = -(-L // chunk)  # chunks
  C = -(-L // n)  # positions per chunk (<= chunk); the row is padded to n * C, masked
  pad = ((0, 0), (0, n * C - L))
  # Chunk j holds positions j, j + n, j + 2n, ...: it spans the row, so it is split over the
  # length shards as the row is, and taking it needs no communication.
  chunks_axes = ('activation_batch', 'activation_residual_length', None, 'activation_embed')
  h_BxCxNxE = constrain(jnp.pad(hidden_BxLxE, (*pad, (0, 0))).reshape(B, C, n, E), chunks_axes)
  t_NxBxC, m_NxBxC = (
    jnp.pad(x, pad).reshape(B, C, n).transpose(2, 0, 1) for x in (targets_BxL, mask_BxL)
  )
  head_dtype, head_ExV = head_ExV.dtype, head_ExV.astype(dtype)

  def step(carry, xs):
    loss, dh_BxCxNxE, dhead_XxYxExV = carry
    j, t_BxC, m_BxC = xs
    h_BxCxE = constrain(lax.dynamic_index_in_dim(h_BxCxNxE, j, 2, keepdims=False), HIDDEN)
    logits_BxCxV = constrain(
      jnp.einsum('bce,ev->bcv', h_BxCxE, head_ExV, preferred_element_type=jnp.float32), LOGITS
    )
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_logit_BxC = jnp.take_along_axis(logits_BxCxV, t_BxC[..., None], axis=-1)[..., 0]
    loss = loss + jnp.sum(m_BxC * (lse_BxC - target_logit_BxC))
    if not grads:
      return (loss, None, None), None
    # d loss / d logits = (softmax - one-hot) * mask, in the compute dtype as autodiff's.
    target_BxCxV = t_BxC[..., None] == jnp.arange(V)
    d_BxCxV = (jnp.exp(logits_BxCxV - lse_BxC[..., None]) - target_BxCxV) * m_BxC[..., None]
    d_BxCxV = constrain(d_BxCxV.astype(dtype), LOGITS)
    dh_BxCxE = jnp.einsum('bcv,ev->bce', d_BxCxV, head_ExV, preferred_element_type=jnp.float32)
    dh_BxCxNxE = lax.dynamic_update_index_in_dim(dh_BxCxNxE, dh_BxCxE.astype(dtype), j, 2)
    # Each (batch shard, length shard) adds its tokens' products to its own slot; a sum into
    # one [E, V] would reduce the head's gradient across those shards once per chunk.
    h_XxYxTxE, d_XxYxTxV = (_slots(x, X, Y) for x in (h_BxCxE, d_BxCxV))
    dhead_XxYxExV = constrain(
      dhead_XxYxExV
      + jnp.einsum('xyte,xytv->xyev', h_XxYxTxE, d_XxYxTxV, preferred_element_type=jnp.float32),
      SLOTS,
    )
    return (loss, dh_BxCxNxE, dhead_XxYxExV), None

  # Slots: one per batch shard (X) and length shard (Y) where they divide the chunk evenly.
  X, Y = sharding.current_split(HIDDEN[0]), sharding.current_split(HIDDEN[1])
  if B % X or C % Y:
    X, Y = 1, 1
  init = (jnp.zeros((), jnp.float32), None, None)
  if grads:
    dh_BxCxNxE = constrain(jnp.zeros_like(h_BxCxNxE), chunks_axes)
    init = (init[0], dh_BxCxNxE, constrain(jnp.zeros((X, Y, E, V), jnp.float32), SLOTS))
  if n == 1:
    (loss, dh_BxCxNxE, dhead_XxYxExV), _ = step(init, (0, t_NxBxC[0], m_NxBxC[0]))
  else:
    (loss, dh_BxCxNxE, dhead_XxYxExV), _ = lax.scan(step, init, (jnp.arange(n), t_NxBxC, m_NxBxC))
  if not grads:
    return loss, None, None
  dhidden_BxLxE = dh_BxCxNxE.reshape(B, n * C, E)[:, :L]
  dhead_ExV = constrain(jnp.sum(dhead_XxYxExV, axis=(0, 1)), HEAD)  # the one reduction
  return loss, dhidden_BxLxE, dhead_ExV.astype(head_dtype)


# The head gradient's per-shard partial sums: [batch shards, length shards, E, V].
SLOTS = ('activation_batch', 'activation_length', 'activation_embed', 'activation_vocab')


def _slots(x_BxCxD, X: int, Y: int):
  """[B, C, D] -> [X, Y, B/X * C/Y, D]: the rows and positions of each batch and length shard
  as one token dim, so that a product summed over tokens keeps one partial per shard (each
  shard's block stays on its device: no communication)."""
  B, C, D = x_BxCxD.shape
  x = x_BxCxD.reshape(X, B // X, Y, C // Y, D).transpose(0, 2, 1, 3, 4)
  return x.reshape(X, Y, (B // X) * (C // Y), D)
