"""Metric writers (`metrics.jsonl`, TensorBoard, console, optional Weights & Biases) and alerts.

Only process 0 writes. TensorBoard goes through tensorboardX, which needs no TensorFlow.
Each record carries throughput: tokens/s, step time, MFU (model FLOPs per token, from
k2jax/model/config.py, over `monitor.peak_tflops` per device: 989 for H100/H200 dense
BF16) and the ETA. Alerts (k2jax/observe/alerts.py) go to the webhook that
`monitor.webhook_url` names, when set.

`python -m k2jax.monitor WORKDIR` summarises a run and plots its curves (k2jax/observe/run_summary.py).
"""

import json
import math
import os
import shutil
import sys
import time

import jax

from k2jax.observe import alerts

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


def check_settings(monitor_cfg) -> None:
  """Fails before training on settings that cannot work (called by run_config.validate)."""
  if monitor_cfg.get('wandb_project'):
    try:
      import wandb  # noqa: F401
    except ImportError:
      raise ValueError(
        'monitor.wandb_project is set but wandb is not installed '
        '(pip install wandb, or leave monitor.wandb_project empty)'
      ) from None
  alerts.webhook_url(monitor_cfg.get('webhook_url', ''))  # set and usable, or raises
  if monitor_cfg.get('peak_tflops', 1) <= 0:
    raise ValueError(f'monitor.peak_tflops must be > 0, got {monitor_cfg.peak_tflops}')


class Monitor:
  """Writes one record per logged step to every sink; tracks throughput between records."""

  def __init__(
    self,
    workdir: str,
    total_steps: int,
    tokens_per_step: int,
    *,
    flops_per_token: float = 0.0,
    settings=None,
    config: dict | None = None,
  ):
    settings = settings or {}
    self.total_steps = total_steps
    self.tokens_per_step = tokens_per_step
    # MFU's denominator: the peak of every device in the run.
    self._peak_flops = settings.get('peak_tflops', 989.0) * 1e12 * jax.device_count()
    self._flops_per_token = flops_per_token
    self.is_writer = jax.process_index() == 0
    self._jsonl = None
    self._tensorboard = None
    self._wandb = None
    self._webhook = None
    self._watchdog = None
    run_name = os.path.basename(os.path.abspath(workdir))
    if self.is_writer:
      os.makedirs(workdir, exist_ok=True)
      # Append: a restarted run adds to its history instead of erasing it.
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', buffering=1)
      if SummaryWriter is not None:
        self._tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      if settings.get('wandb_project'):
        import wandb

        # resume='allow' with the workdir as id: a restarted run continues the same W&B run.
        self._wandb = wandb.init(
          project=settings['wandb_project'],
          name=run_name,
          id=run_name,
          resume='allow',
          config=alerts.redacted_config(config or {}),
          dir=workdir,
        )
      url = alerts.webhook_url(settings.get('webhook_url', ''))
      if url:
        self._webhook = alerts.Webhook(url, run_name, self.info)
      if settings.get('stall_minutes'):
        self._watchdog = alerts.StallWatchdog(
          settings['stall_minutes'],
          lambda minutes: self.alert(
            f'stalled: no step finished for {minutes:.0f} min', kind='stall'
          ),
        )
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
    tokens_per_sec = steps * self.tokens_per_step / elapsed
    return {
      'tokens_per_sec': tokens_per_sec,
      'step_time_sec': elapsed / steps,
      'mfu': tokens_per_sec * self._flops_per_token / self._peak_flops,
      'eta_sec': overall * (self.total_steps - step),
    }

  def write(self, step: int, metrics: dict):
    record = {'step': step, **{k: _plain(v) for k, v in metrics.items()}}
    if not self.is_writer:
      return record
    self._jsonl.write(json.dumps(record) + '\n')
    scalars = {k: v for k, v in record.items() if k != 'step' and isinstance(v, (int, float))}
    if self._tensorboard is not None:
      for key, value in scalars.items():
        self._tensorboard.add_scalar(key, value, step)
    if self._wandb is not None:
      self._wandb.log(scalars, step=step)
    self.console(step, record)
    return record

  def alert(self, text: str, kind: str = 'info'):
    """Prints a warning and, with a webhook, notifies people (rate-limited per kind)."""
    self.info(f'warning: {text}')
    if self._webhook is not None:
      self._webhook.send(text, kind)

  def heartbeat(self):
    """A step finished: resets the stall watchdog."""
    if self._watchdog is not None:
      self._watchdog.beat()

  def console(self, step: int, record: dict):
    width = len(str(self.total_steps))
    parts = [f'step {step:>{width}}/{self.total_steps}']
    for key, label, fmt in (
      ('loss', 'loss', '.4f'),
      ('eval_loss', 'eval loss', '.4f'),
      ('learning_rate', 'lr', '.3e'),
      ('grad_norm', 'grad norm', '.3f'),
      ('tokens_per_sec', 'tok/s', ',.0f'),
      ('mfu', 'MFU', '.1%'),
    ):
      if key in record:
        parts.append(f'{label} {record[key]:{fmt}}')
    if 'eta_sec' in record:
      parts.append(f'ETA {format_duration(record["eta_sec"])}')
    print(' | '.join(parts), flush=True)

  def info(self, message: str):
    if self.is_writer:
      print(message, file=sys.stdout, flush=True)

  def close(self):
    if self._watchdog is not None:
      self._watchdog.close()
    if self._webhook is not None:
      self._webhook.close()
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tensorboard is not None:
      self._tensorboard.close()
    if self._wandb is not None:
      self._wandb.finish()


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
