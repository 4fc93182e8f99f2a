"""Metric writers: `metrics.jsonl`, TensorBoard event files, and console progress.

Only process 0 writes. TensorBoard goes through tensorboardX, which needs no TensorFlow.
"""

import json
import math
import os
import shutil
import sys
import time

import jax

try:
  from tensorboardX import SummaryWriter
except ImportError:  # TensorBoard output is optional
  SummaryWriter = None


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f'{hours}h{minutes:02d}m' if hours else f'{minutes}m{seconds:02d}s'


class Monitor:
  """Writes one record per logged step to every sink; tracks throughput between records."""

  def __init__(self, workdir: str, total_steps: int, tokens_per_step: int):
    self.total_steps = total_steps
    self.tokens_per_step = tokens_per_step
    self.is_writer = jax.process_index() == 0
    self._jsonl = None
    self._tensorboard = None
    if self.is_writer:
      os.makedirs(workdir, exist_ok=True)
      # Append: a restarted run adds to its history instead of erasing it.
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', buffering=1)
      if SummaryWriter is not None:
        self._tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    self._start_time = None
    self._last_time = None
    self._last_step = None

  def drop_after(self, step: int):
    """Forgets records of steps after `step` (a resumed run repeats them).

    The records dropped are kept in `metrics.jsonl.<time>.bak`, and metrics.jsonl is rewritten
    to a temp file and renamed over, so neither a crash nor a fresh start loses history.
    """
    if not self.is_writer:
      return
    path = self._jsonl.name
    self._jsonl.close()
    with open(path) as f:
      all_lines = f.readlines()
    lines = [line for line in all_lines if _step_of(line) is not None and _step_of(line) <= step]
    if len(lines) == len(all_lines):
      self._jsonl = open(path, 'a', buffering=1)
      return
    shutil.copy2(path, f'{path}.{time.strftime("%Y%m%d-%H%M%S")}.bak')
    with open(path + '.tmp', 'w') as f:
      f.writelines(lines)
      f.flush()
      os.fsync(f.fileno())
    os.replace(path + '.tmp', path)
    self._jsonl = open(path, 'a', buffering=1)

  def start(self, step: int):
    """Marks the clock once the first step has compiled and run."""
    self._start_time = self._last_time = time.perf_counter()
    self._start_step = self._last_step = step

  def exclude(self, seconds: float):
    """Leaves time spent outside training (evals) out of tokens/s and the ETA."""
    if self._last_time is not None:
      self._last_time += seconds
      self._start_time += seconds

  def throughput(self, step: int) -> dict:
    """tokens/s and step time since the previous call, and the ETA of the run."""
    now = time.perf_counter()
    if self._last_time is None or step <= self._last_step:
      return {}
    steps = step - self._last_step
    elapsed = now - self._last_time
    overall = (now - self._start_time) / max(step - self._start_step, 1)
    self._last_time, self._last_step = now, step
    return {
        'tokens_per_sec': steps * self.tokens_per_step / elapsed,
        'step_time_sec': elapsed / steps,
        'eta_sec': overall * (self.total_steps - step),
    }

  def write(self, step: int, metrics: dict):
    record = {'step': step, **{k: _plain(v) for k, v in metrics.items()}}
    if not self.is_writer:
      return record
    self._jsonl.write(json.dumps(record) + '\n')
    if self._tensorboard is not None:
      for key, value in record.items():
        if key != 'step' and isinstance(value, (int, float)):
          self._tensorboard.add_scalar(key, value, step)
    self.console(step, record)
    return record

  def console(self, step: int, record: dict):
    width = len(str(self.total_steps))
    parts = [f'step {step:>{width}}/{self.total_steps}']
    for key, label, fmt in (('loss', 'loss', '.4f'), ('eval_loss', 'eval loss', '.4f'),
                            ('learning_rate', 'lr', '.3e'), ('grad_norm', 'grad norm', '.3f'),
                            ('tokens_per_sec', 'tok/s', ',.0f')):
      if key in record:
        parts.append(f'{label} {record[key]:{fmt}}')
    if 'eta_sec' in record:
      parts.append(f'ETA {format_duration(record["eta_sec"])}')
    print(' | '.join(parts), flush=True)

  def info(self, message: str):
    if self.is_writer:
      print(message, file=sys.stdout, flush=True)

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tensorboard is not None:
      self._tensorboard.close()


def _step_of(line: str) -> int | None:
  """The step of a metrics.jsonl line; None for a line torn by a kill mid-write."""
  try:
    return json.loads(line).get('step')
  except ValueError:
    return None


def _plain(value):
  """numpy / jax scalars -> Python numbers for JSON."""
  if hasattr(value, 'item'):
    value = value.item()
  return value
