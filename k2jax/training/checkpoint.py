"""Checkpoints on Orbax: async saves, keep policy, resume with fallback, `init_from`.

Layout: `<workdir>/checkpoints/<step>/` holds one item per directory:

  params/      the parameters (OCDBT arrays; what `init_from` and conversion read)
  opt_state/   the optimizer state (Adam moments, counters)
  data/        the data position, one JSON file per process: the Grain iterator's get_state(),
               this process's input shard and the step its data order started at
  config/      the resolved run config (JSON)
  meta/        step, total_steps, process count, time (JSON)

and `<workdir>/checkpoints/damaged/<step>-<time>/` holds steps that failed to restore.

Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when every item is
written, so a save killed half-way leaves only a temp directory, which the step listing
ignores and the next manager removes. Arrays are always restored onto the plan's shardings
from abstract arrays: nothing is materialized unsharded.

Parameters and optimizer state restore onto any mesh and any number of processes. The data
position is per process (its place in its input shard, k2jax/parallel/input.py), so it
restores only where the same processes load the same input shards; otherwise the run is
refused (`data_layout_change`), unless `checkpoint.restore_data=False`, which restores the
arrays and starts a fresh, deterministic data order at the restored step.
"""

import datetime
import itertools
import json
import os
import re
import time
import types

import grain
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies
from orbax.checkpoint import multihost

from k2jax import run_config
from k2jax.parallel.sharding import path_name
from k2jax.training.train_step import TrainState

SUBDIR = 'checkpoints'
ITEMS = ('params', 'opt_state', 'data', 'config', 'meta')
DAMAGED = 'damaged'  # where steps that failed to restore are moved


def directory(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), SUBDIR)


def committed_steps(checkpoint_dir: str) -> list[int]:
  """Steps whose save completed, oldest first (temp directories are not steps)."""
  if not os.path.isdir(checkpoint_dir):
    return []
  # Orbax's own listing of finalized steps; a read-only CheckpointManager would log four
  # warnings for every reader (generate, evaluate, convert).
  return sorted(ocp.utils.checkpoint_steps(checkpoint_dir))


class _DataState:
  """The iterator's state taken when the step is saved, not when Grain's handler runs."""

  def __init__(self, state: dict):
    self._json = json.dumps(state, indent=1).encode()

  def get_state(self) -> bytes:  # Grain's handler writes non-iterator states as bytes
    return self._json


def _with_shardings(abstract_tree, shardings):
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings
  )


# Object reprs inside library errors ('See full TensorStore details: <bound method ...>'): noise.
_OBJECT_REPR = re.compile(
  r'\s*(See full [\w ]+ details:\s*)?<[^<>]*\b(at 0x[0-9a-f]+|object|method)\b.*$'
)


def describe_error(error: BaseException) -> str:
  """One readable line for an error raised while restoring: its type and first line, without
  raw object reprs, and the first line of its cause when that says more."""
  texts = []
  seen = set()
  while error is not None and id(error) not in seen and len(texts) < 2:
    seen.add(id(error))
    lines = str(error).strip().splitlines()
    text = _OBJECT_REPR.sub('', lines[0] if lines else '').strip().rstrip('.:;, ')
    texts.append(f'{type(error).__name__}: {text[:300]}' if text else type(error).__name__)
    error = error.__cause__ or error.__context__
  return '; caused by '.join(texts)


# Agreement between hosts goes through jax.distributed's key-value store (as Orbax's own
# multi-host decisions do), not through device collectives: it needs no mesh and no compile.
_COORDINATION_TIMEOUT_MS = 10 * 60 * 1000
_agreements = itertools.count()


def _coordination_client():
  return multihost.get_jax_distributed_client()


def all_hosts_agree(ok: bool) -> bool:
  """True when `ok` holds on every process."""
  if jax.process_count() == 1:
    return ok
  client = _coordination_client()
  key = f'k2jax/agree/{next(_agreements)}'
  client.key_value_set(f'{key}/{jax.process_index()}', str(int(ok)))
  return all(
    client.blocking_key_value_get(f'{key}/{i}', _COORDINATION_TIMEOUT_MS) == '1'
    for i in range(jax.process_count())
  )


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    _coordination_client().wait_at_barrier(name, _COORDINATION_TIMEOUT_MS)


class _EveryMinutes(policies.ContinuousCheckpointingPolicy):
  """A save once `minimum_interval_secs` passed since the last one, or since the start.

  Orbax's policy saves at once when there is no previous step; a run that just started
  has nothing worth saving yet. The decision is made on the primary host and broadcast.
  """

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self._start = types.SimpleNamespace(
      step=-1, metrics=None, time=datetime.datetime.now(tz=datetime.timezone.utc)
    )

  def should_save(self, step, previous_steps, *, context):
    return super().should_save(step, list(previous_steps) or [self._start], context=context)


class Checkpoints:
  """The run's checkpoint manager: `save` every `checkpoint.every` steps, `restore_latest`."""

  def __init__(self, workdir: str, cfg, asynchronous: bool = True):
    ckpt = cfg.checkpoint
    self.directory = directory(workdir)
    keep = [policies.LatestN(ckpt.keep)]
    if ckpt.keep_every:  # permanent milestones, never deleted by LatestN
      keep.append(policies.EveryNSteps(ckpt.keep_every))
    due = []
    if ckpt.every:
      due.append(policies.FixedIntervalPolicy(ckpt.every))
    if ckpt.get('every_minutes', 0):
      # Decided on the primary host and broadcast, so every host saves the same steps.
      due.append(_EveryMinutes(minimum_interval_secs=int(ckpt.every_minutes * 60)))
    self.every = bool(due)
    options = ocp.CheckpointManagerOptions(
      save_decision_policy=policies.AnySavePolicy(due) if due else None,
      preservation_policy=policies.AnyPreservationPolicy(keep),
      cleanup_tmp_directories=True,  # leftovers of saves killed half-way
      enable_async_checkpointing=asynchronous,  # False: benchmarks/checkpoint.py's baseline
      create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._config = run_config.saved_form(cfg)
    self._total_steps = cfg.total_steps
    self.restore_data = ckpt.get('restore_data', True)
    self.data_restored = False  # whether the last restore set the data position

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: TrainState, batches, *, final: bool = False) -> bool:
    """Starts an async save of `state` (after `step` updates) if one is due; True if started.

    Returns once the arrays are copied off the devices, so `state` may be donated next.
    """
    if not self.every:
      return False
    if not (final or self._manager.should_save(step)) or step in self._manager.all_steps():
      return False
    meta = dict(
      step=step, total_steps=self._total_steps, time=time.time(), process_count=jax.process_count()
    )
    args = ocp.args.Composite(
      params=ocp.args.StandardSave(state.params),
      opt_state=ocp.args.StandardSave(state.opt_state),
      data=grain.checkpoint.CheckpointSave(_DataState(batches.get_state())),
      config=ocp.args.JsonSave(self._config),
      meta=ocp.args.JsonSave(meta),
    )
    return self._manager.save(step, args=args, force=True)

  def restore(self, step: int, plan, batches) -> TrainState:
    """The state saved at `step`, on `plan`'s shardings. Sets `batches` to its position, or,
    with `checkpoint.restore_data=False`, starts their fresh order at `step`
    (`batches.restart_order`). A position saved under another data layout raises
    DataLayoutError (the same on every host)."""
    data = self._restores_data(step, batches)
    target = plan.abstract_state
    shardings = plan.state_sharding
    items = dict(
      params=ocp.args.StandardRestore(_with_shardings(target.params, shardings.params)),
      opt_state=ocp.args.StandardRestore(_with_shardings(target.opt_state, shardings.opt_state)),
      meta=ocp.args.JsonRestore(),
    )
    if data:
      items['data'] = grain.checkpoint.CheckpointRestore(batches)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    if restored.meta['step'] != step:
      raise ValueError(f'meta says step {restored.meta["step"]}, directory says {step}')
    if not data:
      batches.restart_order(step)
    self.data_restored = data
    step_array = jax.device_put(jnp.asarray(step, jnp.int32), shardings.step)
    return TrainState(step=step_array, params=restored.params, opt_state=restored.opt_state)

  def _restores_data(self, step: int, batches) -> bool:
    """Whether `step`'s data position is restored (agreed by every host)."""
    if not self.restore_data:
      return False
    change = data_layout_change(self.directory, [step], getattr(batches, 'shard', None))
    if not all_hosts_agree(change is None):
      raise DataLayoutError(
        f'{self.directory}: {change or f"step {step} has another data layout on another host"}'
        f'{restore_data_hint(step)}'
      )
    return True

  def restore_latest(self, plan, batches, warn) -> TrainState | None:
    """The newest checkpoint that restores, falling back to older ones; None if there is none.

    Each checkpoint that fails is reported through `warn` with its step and the error.
    """
    steps = self.steps()[::-1]
    for i, step in enumerate(steps):
      # Files that only this host reads are checked before the collective restore, so a
      # host cannot fail alone inside it while the others wait for it.
      error = self._missing_files(step)
      if all_hosts_agree(error is None):
        try:
          state = self.restore(step, plan, batches)
        except DataLayoutError:
          raise  # an intact step of another layout: not damage
        except Exception as e:  # a damaged step: whatever Orbax or Grain raised
          error = e
      # Every host must resume from the same step: one that failed anywhere failed everywhere.
      if not all_hosts_agree(error is None):
        fallback = (
          f'falling back to step {steps[i + 1]}'
          if i + 1 < len(steps)
          else 'no older checkpoint left'
        )
        reason = describe_error(error) if error else 'it failed to restore on another host'
        warn(
          f'warning: checkpoint step {step} in {self.directory} failed to restore '
          f'({reason}); {fallback}'
        )
        continue
      for damaged in steps[:i]:
        self._set_aside(damaged, warn)
      return state
    if steps:
      raise ValueError(
        f'none of the checkpoints in {self.directory} (steps {steps[::-1]}) could be '
        "restored (each step's error is in the warnings above); they were left in place"
      )
    return None

  def _missing_files(self, step: int) -> Exception | None:
    """A FileNotFoundError / ValueError if this host's part of `step` is missing or unreadable."""
    step_dir = os.path.join(self.directory, str(step))
    try:
      if self.restore_data:
        with open(_data_file(step_dir)) as f:
          json.load(f)
      for item in ('params', 'opt_state', 'meta'):
        if not os.path.isdir(os.path.join(step_dir, item)):
          raise FileNotFoundError(f'{step_dir}/{item} is missing')
    except (OSError, ValueError) as e:
      return e
    return None

  def _set_aside(self, step: int, warn):
    """Moves a damaged step out of the listing (kept for a post-mortem), so that the run
    can save that step again."""
    aside = os.path.join(self.directory, DAMAGED, f'{step}-{int(time.time())}')
    _barrier(f'k2jax_set_aside_{step}_before')  # no host still reads the step
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(aside), exist_ok=True)
      os.rename(os.path.join(self.directory, str(step)), aside)
      warn(f'warning: moved the damaged step {step} to {aside}')
    _barrier(f'k2jax_set_aside_{step}_after')  # every host lists the steps after the move
    self._manager.reload()

  def wait(self):
    """Blocks until the save in flight (if any) is committed."""
    self._manager.wait_until_finished()

  def delete(self, step: int):
    """Removes a committed step (a rollback discards the steps saved after its target)."""
    self._manager.delete(step)

  def close(self):
    """Waits for the save in flight (the only other place the loop waits for one)."""
    self._manager.wait_until_finished()
    self._manager.close()


def read_run_config(step_dir: str) -> dict:
  """The run config saved with a checkpoint step (its `config/` item), as a dict: the one
  reader that training, conversion, generation and evaluation share."""
  path = os.path.join(step_dir, 'config')
  if not os.path.isdir(path):
    raise FileNotFoundError(
      f'checkpoint {step_dir} has no config/ item (the run config that names the model, '
      'its RoPE base and sequence length)'
    )
  return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path)


_DATA_FILE = re.compile(r'process_(\d+)-of-(\d+)\.json$')


class DataLayoutError(ValueError):
  """A step's data position was saved under another process count or input sharding."""


_RESTORE_DATA_HINT = (
  ': its data position (where each process is in the rows it loads) cannot be restored on '
  'this layout. Restart with the saved layout to resume exactly, or set '
  '--config.checkpoint.restore_data=False to continue from step {step} with a fresh data '
  'order (parameters and optimizer state restore onto any mesh). The checkpoints are intact '
  'and were left as they are'
)


def _data_file(step_dir: str) -> str:
  """This process's data position in a step (Grain's handler names it so)."""
  return os.path.join(
    step_dir, 'data', f'process_{jax.process_index()}-of-{jax.process_count()}.json'
  )


def data_layout_change(checkpoint_dir: str, steps: list[int], shard=None) -> str | None:
  """Why the newest of `steps` with a data position cannot restore it on this process
  ('step 10 was saved with 2 process(es), now 1'), or None when it can (or when its files
  do not read: the restore reports a damaged step). `shard` is this process's InputShard
  (k2jax/parallel/input.py); without one only the process count is compared."""
  step, saved_count = saved_process_count(checkpoint_dir, steps)
  if saved_count is None:
    return None
  if saved_count != jax.process_count():
    return f'step {step} was saved with {saved_count} process(es), now {jax.process_count()}'
  try:
    with open(_data_file(os.path.join(checkpoint_dir, str(step)))) as f:
      saved = json.load(f).get('input_shard')
  except (OSError, ValueError, AttributeError):
    return None
  if shard is None or saved is None or list(saved) == [shard.index, shard.count]:
    return None
  return (
    f'step {step} was saved by process {jax.process_index()} loading input shard '
    f'{saved[0]} of {saved[1]}, now shard {shard.index} of {shard.count} (the mesh changed '
    'which rows each process loads)'
  )


def restore_data_hint(step: int) -> str:
  """The advice that ends a refused data layout change."""
  return _RESTORE_DATA_HINT.format(step=step)


def saved_process_count(checkpoint_dir: str, steps: list[int]) -> tuple[int, int | None]:
  """(step, process count) of the newest of `steps` whose data/ item names one; its files
  `process_<i>-of-<n>.json` are what a restore looks up. (newest step, None) if none does."""
  for step in reversed(steps):
    data = os.path.join(checkpoint_dir, str(step), 'data')
    counts = {int(m.group(2)) for m in map(_DATA_FILE.match, _listdir(data)) if m is not None}
    if len(counts) == 1:
      return step, counts.pop()
  return (steps[-1] if steps else 0), None


def saved_run_config(checkpoint_dir: str, steps: list[int]) -> tuple[int, dict | None]:
  """(step, run config) of the newest of `steps`, or (step, None) when its config does not
  read (a damaged step: the restore reports it)."""
  step = steps[-1]
  try:
    return step, read_run_config(os.path.join(checkpoint_dir, str(step)))
  except Exception:  # whatever Orbax raised for a damaged item
    return step, None


def _listdir(path: str) -> list[str]:
  try:
    return os.listdir(path)
  except OSError:
    return []


# --- init_from: the parameters of another run ---------------------------------------------


def resolve_step_dir(path: str) -> str:
  """A run's workdir or checkpoints directory (its newest step), or a step directory."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(os.path.join(path, 'params')):
    return path
  for candidate in (os.path.join(path, SUBDIR), path):
    steps = committed_steps(candidate)
    if steps:
      return os.path.join(candidate, str(steps[-1]))
  raise FileNotFoundError(
    f'init_from={path!r} is neither a step directory (with params/) '
    f'nor a workdir or checkpoints directory with a committed step'
  )


def check_params_fit(step_dir: str, abstract_params) -> None:
  """Raises ValueError naming the first parameter whose shape differs (or that is missing)."""
  saved = ocp.StandardCheckpointer().metadata(os.path.join(step_dir, 'params')).item_metadata
  saved_shapes = {
    path_name(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]
  }
  if not saved_shapes:
    raise ValueError(f'init_from {step_dir}: params/ lists no parameters (damaged?)')
  wanted = {
    path_name(p): tuple(a.shape)
    for p, a in jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  }
  for name, shape in wanted.items():
    if name not in saved_shapes:
      raise ValueError(f'init_from {step_dir}: parameter {name} is not in the checkpoint')
    if saved_shapes[name] != shape:
      raise ValueError(
        f'init_from {step_dir}: parameter {name} has shape {saved_shapes[name]} '
        f'in the checkpoint but {shape} in this model'
      )
  extra = sorted(set(saved_shapes) - set(wanted))
  if extra:
    raise ValueError(
      f'init_from {step_dir}: checkpoint parameter {extra[0]} is not in this '
      f'model ({len(extra)} such)'
    )


def load_params(step_dir: str, plan):
  """The parameters saved in `step_dir`, restored straight onto `plan`'s shardings."""
  target = _with_shardings(plan.abstract_state.params, plan.state_sharding.params)
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(os.path.join(step_dir, 'params'), target)


def load_opt_state(step_dir: str, plan):
  """The optimizer state saved in `step_dir` (`init_from_optimizer`), on `plan`'s shardings.

  The schedule's step counter restarts at 0, so the new stage follows its own schedule; Adam's
  moments and its bias-correction count carry over, as Megatron does when it loads an optimizer
  with an overridden LR scheduler.
  """
  path = os.path.join(step_dir, 'opt_state')
  if not os.path.isdir(path):
    raise ValueError(
      f'init_from_optimizer: {step_dir} has no opt_state/ (a converted HF '
      'checkpoint carries parameters only)'
    )
  target = _with_shardings(plan.abstract_state.opt_state, plan.state_sharding.opt_state)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      opt_state = checkpointer.restore(path, target)
  except (ValueError, KeyError) as error:
    raise ValueError(
      f'init_from_optimizer: the optimizer state in {step_dir} does not fit this '
      f"stage's optimizer ({describe_error(error)})"
    ) from None
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
  return jax.tree.map(
    lambda x: x._replace(count=jnp.zeros_like(x.count)) if is_schedule(x) else x,
    opt_state,
    is_leaf=is_schedule,
  )
