"""The stability policy: skipped updates, loss spikes and rollbacks, decided on the host.

K2-V2's monitor only alerted people; here the trainer acts. Every step's loss is compared
with running statistics of the last `stability.spike_window` good steps:

  skipped  the loss or gradient was not finite; the train step already kept the old
           parameters (k2jax/training/train_step.py), this only counts it
  spike    loss > mean + spike_threshold * std and loss > mean * (1 + spike_min_increase)
  bad      skipped or spike; bad steps stay out of the running statistics

`spike_patience` bad steps in a row ask for a rollback: the loop restores the newest
checkpoint from before the first of them and skips the batches read since, so the data
that caused the spike is not seen again (k2jax/training/loop.py). Every action is appended to
`<workdir>/events.jsonl`, which also carries the totals across restarts.
"""

import collections
import json
import math
import os
import time

EVENTS = 'events.jsonl'
KINDS = ('skipped', 'spike', 'rollback')


class Stability:
  """Watches per-step losses; `observe` says when to roll back."""

  def __init__(self, cfg, workdir: str, is_writer: bool = True):
    self.window = cfg.spike_window
    self.threshold = cfg.spike_threshold
    self.min_increase = cfg.spike_min_increase
    self.patience = cfg.spike_patience
    self.max_rollbacks = cfg.max_rollbacks
    self._losses = collections.deque(maxlen=self.window)
    self._bad_since = None  # first step of the current run of bad steps
    self._path = os.path.join(workdir, EVENTS)
    self._is_writer = is_writer
    self.totals = {kind: 0 for kind in KINDS}
    if os.path.exists(self._path):
      with open(self._path) as f:
        for line in f:
          try:
            kind = json.loads(line).get('event')
          except ValueError:  # a line torn by a kill
            continue
          if kind in self.totals:
            self.totals[kind] += 1

  def metrics(self) -> dict[str, int]:
    return {
      'skipped_steps': self.totals['skipped'],
      'spikes': self.totals['spike'],
      'rollbacks': self.totals['rollback'],
    }

  def _record(self, kind: str, step: int, **details):
    self.totals[kind] += 1
    if self._is_writer:
      with open(self._path, 'a') as f:
        f.write(json.dumps({'event': kind, 'step': step, 'time': time.time(), **details}) + '\n')

  def _is_spike(self, loss: float) -> tuple[bool, float]:
    if len(self._losses) < max(2, self.window // 4):  # too few steps to know what is normal
      return False, math.nan
    mean = sum(self._losses) / len(self._losses)
    std = math.sqrt(sum((x - mean) ** 2 for x in self._losses) / len(self._losses))
    return loss > mean + self.threshold * std and loss > mean * (1 + self.min_increase), mean

  def observe(self, step: int, loss: float, skipped: bool) -> str | None:
    """Classifies `step`; returns 'skipped', 'spike', 'rollback' or None (a good step).

    'rollback' means `patience` bad steps in a row: roll back to before `bad_since`.
    """
    if skipped or not math.isfinite(loss):
      self._record('skipped', step, loss=loss if math.isfinite(loss) else str(loss))
      kind = 'skipped'
    else:
      spike, mean = self._is_spike(loss)
      if not spike:
        self._losses.append(loss)
        self._bad_since = None
        return None
      self._record('spike', step, loss=loss, window_mean=mean)
      kind = 'spike'
    if self._bad_since is None:
      self._bad_since = step
    if self.patience and step - self._bad_since + 1 >= self.patience:
      return 'rollback'
    return kind

  @property
  def bad_since(self) -> int | None:
    return self._bad_since

  def rolled_back(self, from_step: int, to_step: int, skipped_batches: int):
    """Records a rollback; raises once there have been more than max_rollbacks."""
    self._record('rollback', from_step, to_step=to_step, skipped_batches=skipped_batches)
    self._bad_since = None
    if self.totals['rollback'] > self.max_rollbacks:
      raise RuntimeError(
        f'{self.totals["rollback"]} rollbacks, more than '
        f'stability.max_rollbacks={self.max_rollbacks}: the run keeps diverging; '
        f'see {self._path}'
      )
