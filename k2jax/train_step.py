"""The train state, its shardings, and the pure loss / gradient / update functions.

A batch is a dict of [global_batch, seq_len] arrays: `inputs`, `targets`, `positions`,
`segment_ids` (int32) and `loss_mask` (float32). The loss is the token-mean cross-entropy
over `loss_mask`; gradient accumulation splits the batch into micro-batches and sums
gradients and token counts before dividing, so it equals the single-batch step.
"""

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from k2jax import sharding
from k2jax.model import Transformer

BATCH_KEYS = ('inputs', 'targets', 'positions', 'segment_ids', 'loss_mask')


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # number of optimizer updates applied
  params: Any
  opt_state: Any


def abstract_params(model: Transformer, seq_len: int):
  """Parameter shapes with their logical axis names (nn.Partitioned), without allocating."""
  tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), tokens)['params']


def weight_decay_mask(boxed_params):
  """Decay matrices, not norm scales: rank counted without the stacked `layers` axis."""
  return jax.tree.map(lambda p: len([n for n in p.names if n != 'layers']) >= 2, boxed_params,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def state_shardings(mesh, tx: optax.GradientTransformation, boxed_params, fsdp: bool):
  """(abstract TrainState, TrainState of NamedShardings); checks every dim divides its axis."""
  params_sharding = sharding.param_shardings(mesh, boxed_params, fsdp)
  params = nn.unbox(boxed_params)
  opt_state = jax.eval_shape(tx.init, params)
  # Adam's moments mirror the parameters; counters are replicated.
  opt_sharding = optax.tree_map_params(
      tx, lambda _, s: s, opt_state, params_sharding,
      transform_non_params=lambda _: sharding.replicated(mesh))
  step = jax.ShapeDtypeStruct((), jnp.int32)
  abstract = TrainState(step=step, params=params, opt_state=opt_state)
  shardings = TrainState(step=sharding.replicated(mesh), params=params_sharding,
                         opt_state=opt_sharding)
  return abstract, shardings


def make_init_fn(model: Transformer, tx: optax.GradientTransformation, seq_len: int):
  def init(rng):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params = nn.unbox(model.init(rng, tokens)['params'])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return init


def loss_sums(model: Transformer, params, batch):
  """(sum of masked token losses, number of loss tokens), both float32."""
  logits_BxLxV = model.apply({'params': params}, batch['inputs'], batch['positions'],
                             batch['segment_ids'])
  losses_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch['targets'])
  mask_BxL = batch['loss_mask'].astype(jnp.float32)
  return jnp.sum(losses_BxL * mask_BxL), jnp.sum(mask_BxL)


def _microbatches(batch, count: int):
  """[B, L] -> [count, B / count, L], micro-batch i = rows i, i + count, ... so that each
  micro-batch stays spread over every data shard."""
  def split(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def loss_and_grads(model: Transformer, params, batch, accum_steps: int):
  """Token-mean loss and its gradient, accumulated over `accum_steps` micro-batches."""
  grad_fn = jax.value_and_grad(lambda p, b: loss_sums(model, p, b), has_aux=True)

  def accumulate(carry, microbatch):
    grads_sum, loss_sum, tokens = carry
    (loss, count), grads = grad_fn(params, microbatch)
    return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss, tokens + count), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
  if accum_steps == 1:
    (grads, loss, tokens), _ = accumulate(init, batch)
  else:
    (grads, loss, tokens), _ = jax.lax.scan(accumulate, init, _microbatches(batch, accum_steps))
  denominator = jnp.maximum(tokens, 1.0)
  grads = jax.tree.map(lambda g: g / denominator, grads)
  return loss / denominator, grads, tokens


def make_train_step(model: Transformer, tx: optax.GradientTransformation,
                    schedule: Callable, accum_steps: int):
  def train_step(state: TrainState, batch):
    loss, grads, tokens = loss_and_grads(model, state.params, batch, accum_steps)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        'loss': loss,
        'grad_norm': optax.tree.norm(grads),  # before clipping
        'update_norm': optax.tree.norm(updates),
        'param_norm': optax.tree.norm(params),
        'learning_rate': schedule(state.step),  # the rate this update used
        'loss_tokens': tokens,
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics
  return train_step


def make_eval_step(model: Transformer):
  def eval_step(params, batch):
    loss, count = loss_sums(model, params, batch)
    return {'loss_sum': loss, 'loss_tokens': count}
  return eval_step
