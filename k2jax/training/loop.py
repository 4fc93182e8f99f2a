"""The training loop: one step in flight, stability checks every step, evals, saves, rollbacks.

The loop dispatches step N, then reads step N-1's few scalar metrics while N runs, so reading
them does not stall the devices (the next batch is still built on this thread, between
dispatches). Those metrics feed the stability policy (k2jax/training/stability.py) on every
step, through one method, `_settle`, whatever else the step does (eval, save, log); the
monitor writes them every `log_every` steps.

A rollback (a spike that persisted, see stability.py) restores the newest checkpoint from
before the spike, deletes the checkpoints saved since, and reads past the batches the run
had consumed since that checkpoint, so the data that caused the spike is skipped.

The batches come from `TrainBatches`: this process's input shard (k2jax/parallel/input.py) of
the training data, in the run's order. A restart that cannot restore the data position (another
process count, or `checkpoint.restore_data=False`) starts a fresh order at the restored step,
a deterministic function of the seed and that step; the records say since when
(`data_order_since`, 0 for the run's own order).
"""

import time

import grain
import jax
import numpy as np

from data_pipeline import pipeline
from k2jax.parallel import input as batch_input
from k2jax.parallel import sharding
from k2jax.training import preemption, train_step
from k2jax.training.stability import Stability


def order_seed(seed: int, since: int) -> int:
  """The data seed of an order that starts at step `since`: the run's seed for its own order
  (0), else a 32-bit hash of (seed, since), so a fresh order repeats on a repeated restart."""
  if since == 0:
    return seed
  return int(np.random.SeedSequence([seed, since]).generate_state(1)[0])


class TrainBatches(grain.DatasetIterator):
  """This process's training batches, and the order they follow.

  An iterator over pipeline.build's batches for input shard `shard`. Its state is the
  pipeline's plus the input shard and `order_since`, the step the current order started at
  (0: the run's own order from the first step), so a restore rebuilds the same order before
  setting the position.
  """

  def __init__(self, cfg, shard: batch_input.InputShard, context_shards: int = 1):
    super().__init__()  # no fixed parent: a fresh order replaces the pipeline
    self._cfg = cfg
    self.shard = shard
    self._context_shards = context_shards
    self.order_since = 0
    self._batches = self._build(0)

  def _build(self, since: int):
    return pipeline.build(
      self._cfg.data,
      seed=order_seed(self._cfg.seed, since),
      split='train',
      process_index=self.shard.index,
      process_count=self.shard.count,
      context_shards=self._context_shards,
    )

  def restart_order(self, step: int) -> None:
    """A fresh order from `step` on (the data position was not restored)."""
    self.order_since = step
    self._batches = self._build(step)

  def __next__(self):
    return next(self._batches)

  def get_state(self) -> dict:
    return {
      **self._batches.get_state(),
      'input_shard': [self.shard.index, self.shard.count],
      'data_order_since': self.order_since,
    }

  def set_state(self, state: dict) -> None:
    """Restores a position saved by `get_state`; rebuilds the order it belongs to first."""
    state = dict(state)
    state.pop('input_shard', None)
    since = state.pop('data_order_since', 0)
    if since != self.order_since:
      self.order_since = since
      self._batches = self._build(since)
    self._batches.set_state(state)

  @property
  def names(self) -> list[str]:
    return self._batches.names

  @property
  def requested_shares(self) -> list[float]:
    return self._batches.requested_shares

  @property
  def stats(self):
    return self._batches.stats

  def realised_shares(self) -> dict[str, float]:
    return self._batches.realised_shares()


class TrainLoop:
  """Trains a prepared run (k2jax/training/run.py) from a state to `total_steps`."""

  def __init__(self, prepared: dict, checkpoints, monitor):
    self.cfg, self.plan = prepared['cfg'], prepared['plan']
    self.prepared = prepared
    self.batches = prepared['train_batches']
    self.checkpoints = checkpoints
    self.monitor = monitor
    self.stability = Stability(
      self.cfg.stability, prepared['workdir'], is_writer=jax.process_index() == 0
    )
    self.records = []
    self._step_fn = self.plan.jit_train_step()
    self._eval_fn = jax.jit(
      train_step.make_eval_step(self.plan.model),
      in_shardings=(self.plan.state_sharding.params, self.plan.batch_sharding),
      out_shardings=sharding.replicated(self.plan.mesh),
    )
    self._profile = _profile_range(self.cfg.monitor.get('profile_steps', ''))
    self._tracing = False

  def _to_global(self, local_batch):
    return batch_input.global_batch(
      self.plan.batch_sharding, self.prepared['shard'], local_batch, train_step.BATCH_KEYS
    )

  def _evaluate(self, params) -> float:
    # A fresh iterator each time: every eval sees the same held-out batches.
    batches = pipeline.build(
      self.cfg.data, seed=self.cfg.seed, split='eval', **self.prepared['process']
    )
    loss_sum = tokens = 0.0
    for _, local_batch in zip(range(self.cfg.eval_batches), batches):
      out = jax.device_get(self._eval_fn(params, self._to_global(local_batch)))
      loss_sum += float(out['loss_sum'])
      tokens += float(out['loss_tokens'])
    return loss_sum / max(tokens, 1.0)

  def run(self, state, stop_after: int | None = None) -> list[dict]:
    cfg, monitor = self.cfg, self.monitor
    last_step = min(cfg.total_steps, stop_after or cfg.total_steps)
    step = start_step = int(state.step)
    if step >= cfg.total_steps:
      monitor.info(f'already at step {step} of {cfg.total_steps}: nothing to train')
      return self.records
    monitor.info(
      f'training steps {step + 1}..{cfg.total_steps}: {cfg.data.global_batch_size} x '
      f'{cfg.data.seq_len} tokens per step (first step compiles)'
    )
    pending = None  # (step, device metrics) of a step whose metrics are not read yet
    stopping = False
    with preemption.StopRequests(monitor.info) as stops:
      while True:
        dispatched = None  # the next step, unless the run is over or asked to stop
        if step < last_step and not stopping:
          self._maybe_profile(step + 1)
          state, metrics = self._step_fn(state, self._to_global(next(self.batches)))
          step += 1
          dispatched = (step, metrics)
        if pending is not None:  # read the previous step while this one runs
          rolled = self._settle(pending, step)
          pending = None
          if rolled is not None:  # the step just dispatched is discarded with the others
            state, step = rolled
            continue
        if dispatched is None:
          break
        pending = dispatched
        stopping = stops.should_stop(step)
        self.checkpoints.save(step, state, self.batches, final=stopping or step == last_step)
        if step == start_step + 1:  # the clock starts after compilation
          jax.block_until_ready(metrics)
          monitor.start(step)
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.total_steps):
          rolled = self._settle(pending, step)  # this step's own record comes before its eval
          pending = None
          if rolled is not None:
            state, step = rolled
            continue
          eval_start = time.perf_counter()
          self.records.append(monitor.write(step, {'eval_loss': self._evaluate(state.params)}))
          monitor.exclude(time.perf_counter() - eval_start)
    if stopping:
      saved = 'checkpoint saved' if self.checkpoints.every else 'not saved (checkpoint.every=0)'
      # Every process says it, in its own log: with several, they all stopped at this step.
      print(
        f'stopped at step {step} of {cfg.total_steps}, {saved}; '
        'start the same command again to continue',
        flush=True,
      )
    self._stop_profile()
    return self.records

  # --- per-step bookkeeping ---------------------------------------------------------

  def _settle(self, pending, step: int):
    """The one place a finished step is observed and acted on, whatever else the step does
    (eval, save, log): reads `pending` = (its step, device metrics) and, when the stability
    policy asks for it, rolls back. `step` is the newest step dispatched (its batch is read).
    Returns (state, step) after a rollback, else None."""
    if self._finish(*pending) != 'rollback':
      return None
    return self._rollback(step)

  def _finish(self, step: int, device_metrics) -> str | None:
    """Reads a finished step's metrics: stability policy every step, a record on log steps."""
    metrics = jax.device_get(device_metrics)
    action = self.stability.observe(step, float(metrics['loss']), bool(metrics['skipped']))
    if action in ('skipped', 'spike'):
      what = (
        'non-finite loss or gradient: update skipped'
        if action == 'skipped'
        else f'loss spike ({float(metrics["loss"]):.4f})'
      )
      self.monitor.alert(f'step {step}: {what}', kind=action)
    if step % self.cfg.log_every == 0 or step == self.cfg.total_steps or action:
      self.records.append(
        self.monitor.write(
          step,
          {
            **metrics,
            **self.monitor.throughput(step),
            **self.stability.metrics(),
            **_data_metrics(self.batches),
          },
        )
      )
    self.monitor.heartbeat()
    return action

  def _rollback(self, step: int):
    """(state, step) restored from before the bad steps, with their data skipped; None if
    there is no checkpoint to go back to."""
    bad_since = self.stability.bad_since
    self.checkpoints.wait()
    good = [s for s in self.checkpoints.steps() if s < bad_since]
    if not good:
      self.monitor.alert(
        f'step {step}: bad steps since {bad_since} but no checkpoint from before '
        'them: continuing without a rollback',
        kind='spike',
      )
      self.stability.rolled_back(step, step, 0)
      return None
    to = good[-1]
    for later in self.checkpoints.steps():
      if later > to:
        self.checkpoints.delete(later)
    state = self.checkpoints.restore(to, self.plan, self.batches)
    for _ in range(step - to):  # the batches of steps to+1..step: the window that diverged
      next(self.batches)
    self.stability.rolled_back(step, to, step - to)
    self.monitor.alert(
      f'step {step}: rolled back to step {to} (bad steps since {bad_since}); '
      f'skipped {step - to} batches',
      kind='rollback',
    )
    self.monitor.drop_after(to)
    self.records = [r for r in self.records if r['step'] <= to]
    self.monitor.start(to)
    return state, to

  # --- profiling ----------------------------------------------------------------------

  def _maybe_profile(self, step: int):
    if self._profile and step == self._profile[0]:
      trace_dir = f'{self.prepared["workdir"]}/profile'
      jax.profiler.start_trace(trace_dir)
      self.monitor.info(f'profiling steps {self._profile[0]}..{self._profile[1]} into {trace_dir}')
      self._tracing = True
    elif self._profile and step == self._profile[1] + 1:
      self._stop_profile()

  def _stop_profile(self):
    if self._tracing:
      jax.effects_barrier()
      jax.profiler.stop_trace()
      self._tracing = False


def _profile_range(spec: str) -> tuple[int, int] | None:
  """'START:STOP' (inclusive) -> (START, STOP); '' -> None. Checked by run_config.validate."""
  if not spec:
    return None
  start, stop = (int(x) for x in spec.split(':'))
  return start, stop


def _data_metrics(batches) -> dict:
  """What the data pipeline has delivered so far: the step its order started at, padding, and
  each source's share of the loss tokens when the run reads a mixture (compare with the shares
  asked for)."""
  metrics = {}
  if hasattr(batches, 'order_since'):
    metrics['data_order_since'] = batches.order_since
  stats = getattr(batches, 'stats', None)
  if stats is not None:
    metrics['data_pad_fraction'] = stats.pad_fraction
  shares = batches.realised_shares() if hasattr(batches, 'realised_shares') else {}
  if len(shares) > 1:
    metrics.update({f'data_share/{name}': share for name, share in shares.items()})
  return metrics
