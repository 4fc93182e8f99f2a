"""The K2-V2 decoder: embeddings, scanned pre-norm blocks, final norm, untied output head.

Layers are stacked with `nn.scan`, so every block parameter has a leading `layers` axis and
compile time does not grow with depth. Remat wraps the block inside the scan.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from k2jax.attention import Attention
from k2jax.layers import MLP, RMSNorm, constrain, weight
from k2jax.model_config import ModelConfig

RESIDUAL = ('activation_batch', 'activation_residual_length', 'activation_embed')


class Block(nn.Module):
  """x + attention(norm(x)), then x + mlp(norm(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxE, positions_BxL, segment_ids_BxL):
    x_BxLxE = constrain(x_BxLxE, RESIDUAL)
    attn = Attention(self.cfg, name='attention')(
        RMSNorm(self.cfg, name='attention_norm')(x_BxLxE), positions_BxL, segment_ids_BxL)
    x_BxLxE = constrain(x_BxLxE + attn.astype(x_BxLxE.dtype), RESIDUAL)
    mlp = MLP(self.cfg, name='mlp')(RMSNorm(self.cfg, name='mlp_norm')(x_BxLxE))
    x_BxLxE = constrain(x_BxLxE + mlp.astype(x_BxLxE.dtype), RESIDUAL)
    return x_BxLxE, None  # (carry, per-layer output) for nn.scan


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


class Transformer(nn.Module):
  """tokens [B, L] -> logits [B, L, V] (float32)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None):
    cfg = self.cfg
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones_like(tokens_BxL)

    embedding_VxE = weight(self, 'embedding', (cfg.vocab_size, cfg.hidden_size),
                           ('vocab', 'embed'), cfg.init_std, cfg.weight_dtype)
    x_BxLxE = jnp.take(embedding_VxE, tokens_BxL, axis=0).astype(cfg.compute_dtype)
    x_BxLxE = constrain(x_BxLxE, RESIDUAL)

    blocks = nn.scan(
        remat_block(cfg),
        variable_axes={'params': 0},
        split_rngs={'params': True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: 'layers'},
    )
    x_BxLxE, _ = blocks(cfg, name='layers')(x_BxLxE, positions_BxL, segment_ids_BxL)

    x_BxLxE = RMSNorm(cfg, name='final_norm')(x_BxLxE)
    head_ExV = weight(self, 'output', (cfg.hidden_size, cfg.vocab_size), ('embed', 'vocab'),
                      cfg.init_std, cfg.weight_dtype)
    logits_BxLxV = jnp.einsum('ble,ev->blv', x_BxLxE, head_ExV.astype(cfg.compute_dtype))
    logits_BxLxV = constrain(logits_BxLxV, ('activation_batch', 'activation_length',
                                            'activation_vocab'))
    return logits_BxLxV.astype(jnp.float32)
