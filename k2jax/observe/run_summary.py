"""What a run did, in a few lines and one picture (`python -m k2jax.monitor WORKDIR`).

Reads `metrics.jsonl`, `events.jsonl` (k2jax/training/stability.py) and the checkpoint listing; prints
progress, latest and best losses, throughput, skipped steps, spikes and rollbacks; writes a
PNG of the loss (and eval loss), gradient norm and learning-rate curves, with rollbacks marked.
Works on a live run as well as a finished one.
"""

import json
import os

from k2jax.observe.monitor import format_duration


def read_jsonl(path: str) -> list[dict]:
  """Records of a JSONL file, skipping a line torn by a kill."""
  records = []
  if not os.path.exists(path):
    return records
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except ValueError:
        continue
  return records


def summarize(workdir: str) -> dict:
  """The run's figures as a dict (also what --output=json prints)."""
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(metrics_path):
    raise FileNotFoundError(
      f'{workdir} has no metrics.jsonl: not a k2jax run directory (or it has not logged a step yet)'
    )
  records = read_jsonl(metrics_path)
  train = [r for r in records if 'loss' in r]
  evals = [r for r in records if 'eval_loss' in r]
  events = read_jsonl(os.path.join(workdir, 'events.jsonl'))
  total_steps = None
  config_path = os.path.join(workdir, 'config.json')
  if os.path.exists(config_path):
    with open(config_path) as f:
      total_steps = json.load(f).get('total_steps')
  from k2jax.training import checkpoint

  summary = {
    'workdir': os.path.abspath(workdir),
    'step': max((r['step'] for r in records), default=0),
    'total_steps': total_steps,
    'checkpoints': checkpoint.committed_steps(checkpoint.directory(workdir)),
    'skipped_steps': sum(e['event'] == 'skipped' for e in events),
    'spikes': sum(e['event'] == 'spike' for e in events),
    'rollbacks': [(e['step'], e.get('to_step')) for e in events if e['event'] == 'rollback'],
  }
  if train:
    last = train[-1]
    summary.update(
      loss=last['loss'],
      min_loss=min(r['loss'] for r in train),
      grad_norm=last.get('grad_norm'),
      learning_rate=last.get('learning_rate'),
    )
    recent = [r for r in train[-10:] if 'tokens_per_sec' in r]
    if recent:
      summary['tokens_per_sec'] = sum(r['tokens_per_sec'] for r in recent) / len(recent)
      summary['mfu'] = sum(r.get('mfu', 0.0) for r in recent) / len(recent)
      summary['eta_sec'] = recent[-1].get('eta_sec')
  if evals:
    summary.update(
      eval_loss=evals[-1]['eval_loss'], best_eval_loss=min(r['eval_loss'] for r in evals)
    )
  return summary


def describe(summary: dict) -> str:
  total = summary['total_steps'] or '?'
  lines = [f'{summary["workdir"]}: step {summary["step"]} of {total}']
  if 'loss' in summary:
    lines.append(
      f'  loss {summary["loss"]:.4f} (lowest {summary["min_loss"]:.4f}), '
      f'grad norm {summary["grad_norm"]:.3f}, lr {summary["learning_rate"]:.3e}'
    )
  if 'eval_loss' in summary:
    lines.append(f'  eval loss {summary["eval_loss"]:.4f} (best {summary["best_eval_loss"]:.4f})')
  if 'tokens_per_sec' in summary:
    eta = summary.get('eta_sec')
    lines.append(
      f'  {summary["tokens_per_sec"]:,.0f} tokens/s, MFU {summary["mfu"]:.1%}'
      + (f', ETA {format_duration(eta)}' if eta is not None else '')
    )
  ckpts = summary['checkpoints']
  lines.append(f'  checkpoints: {", ".join(map(str, ckpts)) if ckpts else "none"}')
  rollbacks = ', '.join(f'{a}->{b}' for a, b in summary['rollbacks']) or 'none'
  lines.append(
    f'  skipped steps {summary["skipped_steps"]}, spikes {summary["spikes"]}, rollbacks {rollbacks}'
  )
  return '\n'.join(lines)


def plot(workdir: str, out: str) -> None:
  """Loss / eval loss, grad norm and learning rate against step, rollbacks as lines."""
  import matplotlib

  matplotlib.use('Agg')  # files only, no display
  from matplotlib import pyplot as plt

  records = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  train = [r for r in records if 'loss' in r]
  evals = [r for r in records if 'eval_loss' in r]
  rollbacks = [
    e for e in read_jsonl(os.path.join(workdir, 'events.jsonl')) if e['event'] == 'rollback'
  ]
  fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
  steps = [r['step'] for r in train]
  axes[0].plot(steps, [r['loss'] for r in train], label='loss')
  if evals:
    axes[0].plot(
      [r['step'] for r in evals], [r['eval_loss'] for r in evals], 'o-', label='eval loss'
    )
  axes[0].legend()
  axes[1].plot(steps, [r.get('grad_norm', float('nan')) for r in train])
  axes[1].set_ylabel('grad norm')
  axes[2].plot(steps, [r.get('learning_rate', float('nan')) for r in train])
  axes[2].set_ylabel('learning rate')
  axes[2].set_xlabel('step')
  for ax in axes:
    for event in rollbacks:
      ax.axvline(event['step'], color='red', alpha=0.4, linestyle='--')
  fig.suptitle(os.path.basename(os.path.abspath(workdir)))
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
