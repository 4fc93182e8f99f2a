"""The train state, its shardings, and the pure loss / gradient / update functions.

A batch is a dict of [global_batch, seq_len] arrays: `inputs`, `targets`, `positions`,
`segment_ids` (int32) and `loss_mask` (float32). The loss is the token-mean cross-entropy
over `loss_mask`, from the logits of `model.loss_chunk` positions of each row at a time
(model.transformer.cross_entropy_sum); gradient accumulation splits the batch into
micro-batches and sums gradients and token counts before dividing, so it equals the
single-batch step.

Two layouts per parameter (parallel/sharding.py): where the parameter lives, and where its
gradient, Adam moments and update live. Under `mesh.fsdp=optimizer` (ZeRO-1) the second is
sharded over the data axes and the first is not: the summed gradient is constrained to the
update layout (a reduce-scatter rather than an all-reduce), each device updates only its
slice of the parameters, and the new parameters are constrained back to their own layout
(an all-gather). Under `none` and `full` the two layouts coincide. The arithmetic is the same
in every mode; only where it runs differs.
"""

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from data_pipeline import load_balance
from k2jax.model import config as model_config
from k2jax.model.kernels import select as attention_select
from k2jax.model.transformer import Transformer, cross_entropy_sum
from k2jax.parallel import sharding
from k2jax.training import optim

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
  return jax.tree.map(
    lambda p: len([n for n in p.names if n != 'layers']) >= 2,
    boxed_params,
    is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )


def state_shardings(mesh, tx: optax.GradientTransformation, boxed_params, fsdp):
  """(abstract TrainState, TrainState of NamedShardings); checks every dim divides its axis.

  `fsdp` is a `mesh.fsdp` mode (or the old boolean)."""
  params_sharding = sharding.param_shardings(mesh, boxed_params, fsdp)
  params = nn.unbox(boxed_params)
  opt_state = jax.eval_shape(tx.init, params)
  # Adam's moments lie as the updates do (sharded over data from 'optimizer' on); counters
  # are replicated.
  opt_sharding = optax.tree_map_params(
    tx,
    lambda _, s: s,
    opt_state,
    sharding.update_shardings(mesh, boxed_params, fsdp),
    transform_non_params=lambda _: sharding.replicated(mesh),
  )
  step = jax.ShapeDtypeStruct((), jnp.int32)
  abstract = TrainState(step=step, params=params, opt_state=opt_state)
  shardings = TrainState(
    step=sharding.replicated(mesh), params=params_sharding, opt_state=opt_sharding
  )
  return abstract, shardings


def make_init_fn(model: Transformer, tx: optax.GradientTransformation, seq_len: int):
  state_from_params = make_state_from_params(tx)

  def init(rng):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return state_from_params(nn.unbox(model.init(rng, tokens)['params']))

  return init


def make_state_from_params(tx: optax.GradientTransformation):
  """A fresh stage from given parameters: step 0, a new optimizer state (`init_from`)."""

  def state_from_params(params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return state_from_params


def loss_sums(model: Transformer, params, batch):
  """(sum of masked token losses, number of loss tokens), both float32."""
  inputs = (batch['inputs'], batch['positions'], batch['segment_ids'])
  mask_BxL = batch['loss_mask'].astype(jnp.float32)
  chunk = model.cfg.loss_chunk
  if chunk:
    hidden_BxLxE, head_ExV = model.apply({'params': params}, *inputs, hidden=True)
    loss = cross_entropy_sum(hidden_BxLxE, head_ExV, batch['targets'], mask_BxL, chunk)
  else:  # the whole [B, L, V] logits at once
    logits_BxLxV = model.apply({'params': params}, *inputs)
    losses_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch['targets'])
    loss = jnp.sum(losses_BxL * mask_BxL)
  return loss, jnp.sum(mask_BxL)


def param_axes(model: Transformer):
  """The parameters' logical axis names, a PartitionSpec per parameter."""
  return nn.get_partition_spec(abstract_params(model, 1))


def _microbatches(batch, count: int):
  """[B, L] -> [count, B / count, L], micro-batch i = rows i, i + count, ... so that each
  micro-batch stays spread over every data shard."""

  def split(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)

  return jax.tree.map(split, batch)


def _constrain(tree, shardings):
  return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)


def loss_and_grads(model: Transformer, params, batch, accum_steps: int, grad_sharding=None):
  """Token-mean loss and its gradient, accumulated over `accum_steps` micro-batches.

  The gradient sums lie as `grad_sharding` says (the update layout), else as the parameters
  do (e.g. FSDP shards): never replicated where the state is sharded."""
  grad_fn = jax.value_and_grad(lambda p, b: loss_sums(model, p, b), has_aux=True)
  if grad_sharding is None:
    axes = param_axes(model)
    like_params = lambda grads: nn.with_logical_constraint(grads, axes)  # noqa: E731
  else:
    like_params = lambda grads: _constrain(grads, grad_sharding)  # noqa: E731

  def accumulate(carry, microbatch):
    grads_sum, loss_sum, tokens = carry
    (loss, count), grads = grad_fn(params, microbatch)
    grads_sum = like_params(jax.tree.map(jnp.add, grads_sum, grads))
    return (grads_sum, loss_sum + loss, tokens + count), None

  zeros = like_params(jax.tree.map(jnp.zeros_like, params))
  init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
  if accum_steps == 1:
    (grads, loss, tokens), _ = accumulate(init, batch)
  else:
    (grads, loss, tokens), _ = jax.lax.scan(accumulate, init, _microbatches(batch, accum_steps))
  denominator = jnp.maximum(tokens, 1.0)
  grads = jax.tree.map(lambda g: g / denominator, grads)
  return loss / denominator, grads, tokens


def make_train_step(
  model: Transformer,
  tx: optax.GradientTransformation,
  schedule: Callable,
  accum_steps: int,
  param_sharding=None,
  update_sharding=None,
):
  """The update. `param_sharding` / `update_sharding` (trees of NamedShardings, the Plan's)
  place the parameters and their gradients / updates; without them XLA follows the
  parameters' logical axes."""

  def train_step(state: TrainState, batch):
    loss, grads, tokens = loss_and_grads(model, state.params, batch, accum_steps, update_sharding)
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient skips the update: parameters and optimizer state
    # (moments, and the count that drives the learning rate) stay as they were. The step
    # still advances, so the batch is consumed and not retried.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    # ZeRO-1: each device updates its own slice of the (replicated) parameters, a local slice,
    # and only the new slice is gathered into the parameters' layout. A skipped update adds
    # zeros there, so old and new parameters are never both whole (a select between them
    # would be: 34 GB more per device for the 70B model).
    old = _constrain(state.params, update_sharding)
    updates, opt_state = tx.update(grads, state.opt_state, old)
    updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
    params = _constrain(optax.apply_updates(old, updates), param_sharding)
    opt_state = keep(opt_state, state.opt_state)
    metrics = {
      'loss': loss,
      'grad_norm': grad_norm,  # before clipping
      'update_norm': jnp.where(finite, optax.tree.norm(updates), 0.0),
      'param_norm': optax.tree.norm(params),
      # The rate this update used (or, skipped, would have used): the schedule at the
      # optimizer's own count, which a skipped step does not advance, not at state.step.
      'learning_rate': schedule(optim.schedule_count(state.opt_state)),
      'loss_tokens': tokens,
      'skipped': 1.0 - finite.astype(jnp.float32),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model: Transformer):
  def eval_step(params, batch):
    loss, count = loss_sums(model, params, batch)
    return {'loss_sum': loss, 'loss_tokens': count}

  return eval_step


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a run compiles: model, optimizer, mesh, and where every array lives."""

  model_cfg: Any  # with `attention` resolved to the backend the step uses
  attention: attention_select.Choice  # that backend, and why
  model: Transformer
  mesh: Any
  tx: optax.GradientTransformation
  schedule: Callable
  abstract_state: TrainState
  state_sharding: TrainState
  batch_sharding: Any  # of one [batch, seq_len] input array
  accum_steps: int
  update_sharding: Any = None  # per parameter: its gradient, moments and update (fsdp mode)

  def jit_train_step(self):
    """The jitted update: explicit shardings in and out, the old state's buffers donated."""
    return jax.jit(
      make_train_step(
        self.model,
        self.tx,
        self.schedule,
        self.accum_steps,
        param_sharding=self.state_sharding.params,
        update_sharding=self.update_sharding,
      ),
      in_shardings=(self.state_sharding, self.batch_sharding),
      out_shardings=(self.state_sharding, sharding.replicated(self.mesh)),
      donate_argnums=0,
    )


def choose_attention(cfg, model_cfg, mesh, micro_batch: int):
  """Resolves `model.attention` for the mesh's devices and the run's rows, checked to fit."""
  platform = attention_select.Platform.of(mesh.devices.flat[0])
  documents = cfg.data.packing != 'concat'  # concat rows are one causal sequence
  seq_len = cfg.data.seq_len
  choice = attention_select.choose(
    model_cfg.attention,
    platform,
    q_length=seq_len,
    kv_length=seq_len,
    compute_dtype=model_cfg.dtype,
    head_dim=model_cfg.head_dim,
    documents=documents,
    # With the length split, a device's queries meet the whole row's keys (parallel/context.py).
    self_attention=sharding.length_shards(mesh) == 1,
  )
  attention_select.check_fits(
    choice,
    platform,
    batch=sharding.local_size(mesh, micro_batch, 'activation_batch'),
    heads=sharding.local_size(mesh, model_cfg.num_heads, 'activation_heads'),
    length=seq_len,
  )
  return dataclasses.replace(model_cfg, attention=choice.name, documents=documents), choice


def plan(cfg, devices=None) -> Plan:
  """Builds the run's plan from a validated config; no device memory is touched.

  Raises ValueError naming the key, dimension or mesh axis that does not fit.
  """
  model_cfg = model_config.from_config(cfg.model)
  mesh = sharding.make_mesh(cfg.mesh, devices)
  fsdp, seq_len = cfg.mesh.fsdp, cfg.data.seq_len
  micro_batch = cfg.data.global_batch_size // cfg.optim.grad_accum_steps
  batch_sharding = sharding.batch_sharding(mesh, (micro_batch, seq_len), fsdp)
  sharding.check_activations(mesh, model_cfg, seq_len, fsdp)
  load_balance.check(seq_len, sharding.length_shards(mesh))
  model_cfg, attention = choose_attention(cfg, model_cfg, mesh, micro_batch)
  model = Transformer(model_cfg)
  boxed = abstract_params(model, seq_len)
  tx = optim.make_optimizer(cfg.optim, cfg.total_steps, weight_decay_mask(boxed))
  abstract_state, state_sharding = state_shardings(mesh, tx, boxed, fsdp)
  return Plan(
    update_sharding=sharding.update_shardings(mesh, boxed, fsdp),
    model_cfg=model_cfg,
    attention=attention,
    model=model,
    mesh=mesh,
    tx=tx,
    schedule=optim.make_schedule(cfg.optim, cfg.total_steps),
    abstract_state=abstract_state,
    state_sharding=state_sharding,
    batch_sharding=batch_sharding,
    accum_steps=cfg.optim.grad_accum_steps,
  )
