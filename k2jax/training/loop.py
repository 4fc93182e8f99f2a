"""The training loop: one step in flight, stability checks every step, evals, saves, rollbacks.

The loop dispatches step N, then reads step N-1's few scalar metrics while N runs, so reading
them does not stall the devices (the next batch is still built on this thread, between
dispatches). Those metrics feed the stability policy (k2jax/training/stability.py) on every
step, through one method, `_settle`, whatever else the step does (eval, save, log); the
monitor writes them every `log_every` steps.

A rollback (a spike that persisted, see stability.py) restores the newest checkpoint from
before the spike, deletes the checkpoints saved since, and reads past the batches the run
had consumed since that checkpoint, so the data that caused the spike is skipped.
"""

import time

import jax

from data_pipeline import pipeline
from k2jax.parallel import sharding
from k2jax.training import preemption, train_step
from k2jax.training.stability import Stability


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
    return {
      key: sharding.host_array(self.plan.batch_sharding, local_batch[key])
      for key in train_step.BATCH_KEYS
    }

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
      monitor.info(
        f'stopped at step {step} of {cfg.total_steps}, {saved}; '
        'start the same command again to continue'
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
  """What the data pipeline has delivered so far: padding, and each source's share of the
  loss tokens when the run reads a mixture (compare with the shares asked for)."""
  metrics = {}
  stats = getattr(batches, 'stats', None)
  if stats is not None:
    metrics['data_pad_fraction'] = stats.pad_fraction
  shares = batches.realised_shares() if hasattr(batches, 'realised_shares') else {}
  if len(shares) > 1:
    metrics.update({f'data_share/{name}': share for name, share in shares.items()})
  return metrics
