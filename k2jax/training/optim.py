"""AdamW and learning-rate schedules, set up the way K2-V2 was trained.

The optimizer is the usual LLM recipe: clip gradients by global L2 norm, then
Adam (b1=0.9, b2=0.95), then decoupled weight decay on matrices only, all
scaled by a scheduled learning rate.

Step convention: a schedule is a function of the optimizer's update count,
which optax starts at 0. So `schedule(0) == 0` during warmup, and the decay
reaches `min_lr` at step `warmup_steps + decay_steps` (cosine) or at
`total_steps` (wsd). The final update of a run (count `total_steps - 1`) is
therefore one small decay increment above the floor, never wasted at lr=0.
"""

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ('cosine', 'constant', 'wsd')
WSD_DECAY_SHAPES = ('linear', 'cosine', 'sqrt')


def _get(optim_cfg, key, default):
  """Reads an optional field, so older configs without it keep working."""
  value = optim_cfg.get(key, default)
  return default if value is None else value


def _validate(optim_cfg, total_steps: int) -> None:
  """Fails early, naming the offending config key, instead of mid-training."""
  schedule = optim_cfg.schedule
  if schedule not in SCHEDULES:
    raise ValueError(f'optim.schedule={schedule!r} is not one of {"|".join(SCHEDULES)}')
  if total_steps <= 0:
    raise ValueError(f'total_steps={total_steps} must be positive')
  if not optim_cfg.peak_lr > 0:
    raise ValueError(f'optim.peak_lr={optim_cfg.peak_lr} must be positive')
  if optim_cfg.min_lr < 0:
    raise ValueError(f'optim.min_lr={optim_cfg.min_lr} must be >= 0')
  if optim_cfg.min_lr > optim_cfg.peak_lr:
    raise ValueError(
      f'optim.min_lr={optim_cfg.min_lr} must be <= optim.peak_lr={optim_cfg.peak_lr}'
    )
  warmup_steps = optim_cfg.warmup_steps
  if warmup_steps < 0:
    raise ValueError(f'optim.warmup_steps={warmup_steps} must be >= 0')
  # A constant schedule with a warmup longer than the run is odd but harmless;
  # for decaying schedules it means the decay never happens.
  if schedule != 'constant' and warmup_steps > total_steps:
    raise ValueError(
      f'optim.warmup_steps={warmup_steps} exceeds '
      f'total_steps={total_steps} for schedule={schedule!r}'
    )

  decay_steps = _get(optim_cfg, 'decay_steps', 0)
  if decay_steps < 0:
    raise ValueError(
      f'optim.decay_steps={decay_steps} must be >= 0 (0 means total_steps - warmup_steps)'
    )

  if schedule == 'wsd':
    fraction = _get(optim_cfg, 'wsd_decay_fraction', 0.1)
    if not 0 < fraction <= 1:
      raise ValueError(f'optim.wsd_decay_fraction={fraction} must be in (0, 1]')
    shape = _get(optim_cfg, 'wsd_decay_shape', 'linear')
    if shape not in WSD_DECAY_SHAPES:
      raise ValueError(
        f'optim.wsd_decay_shape={shape!r} is not one of {"|".join(WSD_DECAY_SHAPES)}'
      )
    decay_len = _wsd_decay_len(fraction, total_steps)
    if warmup_steps > total_steps - decay_len:
      raise ValueError(
        f'optim.warmup_steps={warmup_steps} overlaps the wsd decay phase '
        f'(last {decay_len} of total_steps={total_steps}, from '
        f'optim.wsd_decay_fraction={fraction})'
      )

  if not 0 <= optim_cfg.b1 < 1:
    raise ValueError(f'optim.b1={optim_cfg.b1} must be in [0, 1)')
  if not 0 <= optim_cfg.b2 < 1:
    raise ValueError(f'optim.b2={optim_cfg.b2} must be in [0, 1)')
  if not optim_cfg.eps > 0:
    raise ValueError(f'optim.eps={optim_cfg.eps} must be positive')
  if optim_cfg.weight_decay < 0:
    raise ValueError(f'optim.weight_decay={optim_cfg.weight_decay} must be >= 0')
  clip_norm = _get(optim_cfg, 'clip_norm', 0.0)
  if clip_norm < 0:
    raise ValueError(f'optim.clip_norm={clip_norm} must be >= 0 (0 or None disables)')


def _wsd_decay_len(fraction: float, total_steps: int) -> int:
  # At least one step, so a tiny fraction still ends at min_lr.
  return max(1, round(fraction * total_steps))


def _warmup_factor(step, warmup_steps: int):
  """Linear ramp 0 -> 1 over warmup_steps; 1 afterwards (and if no warmup)."""
  if warmup_steps == 0:
    return jnp.ones_like(step)
  return jnp.minimum(step / warmup_steps, 1.0)


def _decay_shape(progress, shape: str):
  """Maps decay progress in [0, 1] to a multiplier going from 1 down to 0."""
  if shape == 'linear':
    return 1.0 - progress
  if shape == 'cosine':
    return 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  if shape == 'sqrt':  # "1 - sqrt" cooldown: drops fast early, gently late.
    return 1.0 - jnp.sqrt(progress)
  raise ValueError(f'unknown decay shape {shape!r}')


def make_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Returns step -> learning rate; jit-friendly (step may be traced)."""
  _validate(optim_cfg, total_steps)
  peak_lr = float(optim_cfg.peak_lr)
  min_lr = float(optim_cfg.min_lr)
  warmup_steps = int(optim_cfg.warmup_steps)
  kind = optim_cfg.schedule

  if kind == 'constant':

    def schedule(step):
      step = jnp.asarray(step, jnp.float32)
      return peak_lr * _warmup_factor(step, warmup_steps)

    return schedule

  if kind == 'cosine':
    decay_steps = int(_get(optim_cfg, 'decay_steps', 0))
    if decay_steps == 0:
      decay_steps = total_steps - warmup_steps
    decay_start, shape = warmup_steps, 'cosine'
  else:  # wsd
    fraction = float(_get(optim_cfg, 'wsd_decay_fraction', 0.1))
    decay_steps = _wsd_decay_len(fraction, total_steps)
    decay_start = total_steps - decay_steps
    shape = _get(optim_cfg, 'wsd_decay_shape', 'linear')

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    # max(.., 1) avoids 0/0 when warmup fills the whole run (cosine with
    # decay_steps=0 and warmup_steps == total_steps: no decay phase at all).
    progress = jnp.clip((step - decay_start) / max(decay_steps, 1), 0.0, 1.0)
    decayed = min_lr + (peak_lr - min_lr) * _decay_shape(progress, shape)
    in_warmup = step < warmup_steps
    return jnp.where(in_warmup, peak_lr * _warmup_factor(step, warmup_steps), decayed)

  return schedule


def decay_mask(params):
  """True where weight decay applies: matrices, embeddings, conv kernels.

  1-D params (norm scales, biases) are not decayed, as in Megatron/K2-V2:
  pulling a norm scale toward 0 just fights the model. Uses `.shape` so it
  also works on abstract params (jax.ShapeDtypeStruct).
  """
  return jax.tree.map(lambda p: len(p.shape) >= 2, params)


def make_optimizer(
  optim_cfg, total_steps: int, weight_decay_mask=decay_mask
) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with decay masked to >= 2-D params.

  `weight_decay_mask` (a pytree of bools or a function of the params) overrides the
  default; the model passes one that ignores its stacked `layers` axis, since a stacked
  norm scale is 2-D but is still a norm scale.

  optax.adamw multiplies weight decay by the (scheduled) learning rate, the
  PyTorch/Megatron convention: p -= lr * (adam_update + weight_decay * p).
  """
  schedule = make_schedule(optim_cfg, total_steps)
  adamw = optax.adamw(
    learning_rate=schedule,
    b1=optim_cfg.b1,
    b2=optim_cfg.b2,
    eps=optim_cfg.eps,
    weight_decay=optim_cfg.weight_decay,
    mask=weight_decay_mask,
  )
  clip_norm = _get(optim_cfg, 'clip_norm', 0.0)
  if not clip_norm:
    return adamw
  return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)


def learning_rate_at(optim_cfg, total_steps: int, step: int) -> float:
  """Learning rate at one step, as a Python float (for logs and printing)."""
  return float(make_schedule(optim_cfg, total_steps)(step))


def schedule_keys(optim_cfg) -> tuple[str, ...]:
  """The run-config keys (dotted) the learning-rate schedule of `optim_cfg` depends on: a
  resumed run whose values differ would follow another schedule from its restored step."""
  kind = optim_cfg.get('schedule')
  keys = ['optim.schedule', 'optim.peak_lr', 'optim.warmup_steps']
  if kind == 'cosine':
    keys += ['optim.min_lr', 'optim.decay_steps']
    if not _get(optim_cfg, 'decay_steps', 0):
      keys.append('total_steps')  # the decay runs to the end of the stage
  elif kind == 'wsd':
    keys += ['optim.min_lr', 'optim.wsd_decay_fraction', 'optim.wsd_decay_shape', 'total_steps']
  return tuple(keys)


def schedule_count(opt_state) -> jax.Array:
  """The update count the optimizer's learning-rate schedule reads: optax's
  ScaleByScheduleState. It does not advance on a skipped (non-finite) step, so after a skip it
  lags the train state's step."""
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
  counts = [s.count for s in jax.tree.leaves(opt_state, is_leaf=is_schedule) if is_schedule(s)]
  if len(counts) != 1:
    raise ValueError(f'expected one scheduled learning rate in the optimizer, found {len(counts)}')
  return counts[0]
