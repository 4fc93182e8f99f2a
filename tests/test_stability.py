"""The stability policy and the monitor: NaN skips, spike rollbacks with a data skip, alerts,
MFU, profiling, time-based saves and the `python -m k2jax.monitor` summary."""

import http.server
import json
import os
import threading
import time

import grain
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from k2jax import run_config
from k2jax.observe import alerts
from k2jax.training import checkpoint, optim, stability, train_step
from k2jax.training.run import prepare, run
from tests.helpers import read_metrics, small_config


class Injector(grain.DatasetIterator):
  """The training batches, with `corrupt(batch)` applied to the calls numbered in `at` (1-based).

  Its position is the wrapped iterator's, so checkpoints and rollbacks see the real data.
  """

  def __init__(self, parent, at, corrupt):
    super().__init__(parent)
    self.calls = 0
    self._at = set(at)
    self._corrupt = corrupt
    for name in ('names', 'requested_shares', 'realised_shares'):
      setattr(self, name, getattr(parent, name))

  def __next__(self):
    batch = next(self._parent)
    self.calls += 1
    return self._corrupt(dict(batch)) if self.calls in self._at else batch

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


def run_with(cfg, workdir, at, corrupt):
  prepared = prepare(cfg, str(workdir))
  prepared['train_batches'] = Injector(prepared['train_batches'], at, corrupt)
  return run(prepared), prepared['train_batches']


class Receiver(http.server.BaseHTTPRequestHandler):
  """A local stand-in for a Slack webhook: stores every JSON body posted."""

  received = []

  def do_POST(self):
    length = int(self.headers['Content-Length'])
    Receiver.received.append(json.loads(self.rfile.read(length)))
    self.send_response(200)
    self.end_headers()

  def log_message(self, *args):
    pass


@pytest.fixture
def webhook():
  Receiver.received = []
  server = http.server.HTTPServer(('127.0.0.1', 0), Receiver)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield f'http://127.0.0.1:{server.server_port}/hook', Receiver.received
  server.shutdown()


# --- the policy on its own ---------------------------------------------------------------


def policy_cfg(**overrides):
  fields = dict(
    spike_window=8, spike_threshold=3.0, spike_min_increase=0.1, spike_patience=3, max_rollbacks=1
  )
  return ml_collections.ConfigDict({**fields, **overrides})


def test_spikes_need_patience_before_a_rollback(tmp_path):
  policy = stability.Stability(policy_cfg(), str(tmp_path))
  rng = np.random.default_rng(0)
  for step in range(1, 21):  # a noisy plateau around 3.0
    assert policy.observe(step, 3.0 + 0.01 * rng.standard_normal(), False) is None
  assert policy.observe(21, 3.02, False) is None  # within the noise
  assert policy.observe(22, 4.5, False) == 'spike'
  assert policy.observe(23, 3.0, False) is None  # a lone spike resets
  assert policy.observe(24, 4.5, False) == 'spike'
  assert policy.observe(25, float('nan'), True) == 'skipped'
  assert policy.observe(26, 4.6, False) == 'rollback'
  assert policy.bad_since == 24
  policy.rolled_back(26, 20, 6)
  assert policy.metrics() == {'skipped_steps': 1, 'spikes': 3, 'rollbacks': 1}
  # The totals live in events.jsonl, so a restarted run carries them on.
  again = stability.Stability(policy_cfg(), str(tmp_path))
  assert again.metrics() == policy.metrics()
  with pytest.raises(RuntimeError, match='max_rollbacks=1'):
    again.rolled_back(40, 30, 10)


def test_a_falling_loss_is_never_a_spike(tmp_path):
  policy = stability.Stability(policy_cfg(), str(tmp_path))
  assert all(policy.observe(s, 8.0 * 0.97**s, False) is None for s in range(1, 100))


# --- the policy in the loop -----------------------------------------------------------------


def test_non_finite_loss_skips_the_update(tmp_path, webhook):
  url, received = webhook
  cfg = small_config(
    total_steps=6,
    **{'checkpoint.every': 3, 'monitor.webhook_url': url, 'monitor.profile_steps': '2:3'},
  )

  def nan_mask(batch):
    batch['loss_mask'] = batch['loss_mask'].copy()
    batch['loss_mask'][0, 0] = np.nan
    return batch

  records, _ = run_with(cfg, tmp_path, at={5}, corrupt=nan_mask)
  by_step = {r['step']: r for r in records}
  assert np.isnan(by_step[5]['loss']) and by_step[5]['skipped'] == 1.0
  assert by_step[5]['update_norm'] == 0.0
  assert by_step[6]['skipped_steps'] == 1 and np.isfinite(by_step[6]['loss'])
  assert by_step[4]['param_norm'] == by_step[5]['param_norm']  # step 5 changed nothing
  assert by_step[6]['skipped'] == 0.0 and by_step[6]['update_norm'] > 0
  # The logged rate is the one applied: step 5 did not advance the optimizer's count, so
  # steps 5 and 6 both read the schedule at count 4 (steps 1-4 used counts 0-3).
  rate = lambda count: pytest.approx(optim.learning_rate_at(cfg.optim, cfg.total_steps, count))
  assert [by_step[s]['learning_rate'] for s in (4, 5, 6)] == [rate(3), rate(4), rate(4)]
  events = [json.loads(line) for line in open(tmp_path / 'events.jsonl')]
  assert [(e['event'], e['step']) for e in events] == [('skipped', 5)]
  assert all(r['mfu'] > 0 for r in records if 'mfu' in r)
  # The alert reached the webhook; the profile of steps 2-3 is on disk.
  deadline = time.time() + 10
  while not received and time.time() < deadline:
    time.sleep(0.05)
  assert any('step 5' in r['text'] and 'skipped' in r['text'] for r in received), received
  traces = [f for _, _, files in os.walk(tmp_path / 'profile') for f in files]
  assert any(f.endswith('.xplane.pb') for f in traces), traces


@pytest.mark.parametrize(
  'eval_every, rollback_want',
  [
    # Detected at step 16 while step 17 ran: back to the save at 12, steps 13-17's data skipped.
    (0, (17, 12, 5)),
    # Step 16 also evaluates: its metrics are read before the eval, and the rollback due on it
    # happens there (steps 13-16's data skipped), instead of being dropped.
    (16, (16, 12, 4)),
  ],
)
def test_a_persistent_spike_rolls_back_and_skips_its_data(tmp_path, eval_every, rollback_want):
  cfg = small_config(
    total_steps=20,
    eval_every=eval_every,
    **{
      'checkpoint.every': 4,
      'checkpoint.keep': 5,
      'checkpoint.keep_every': 0,
      'stability.spike_window': 6,
      'stability.spike_threshold': 3.0,
      'stability.spike_patience': 3,
      'optim.warmup_steps': 1,
    },
  )
  rng = np.random.default_rng(0)

  def garbage_targets(batch):  # corrupt data: random next tokens
    batch['targets'] = rng.integers(0, 2048, batch['targets'].shape).astype(np.int32)
    return batch

  # Steps 14-16 read corrupted batches: a spike three steps long.
  records, injector = run_with(cfg, tmp_path, at={14, 15, 16}, corrupt=garbage_targets)
  events = [json.loads(line) for line in open(tmp_path / 'events.jsonl')]
  spikes = [e['step'] for e in events if e['event'] == 'spike']
  [rollback] = [e for e in events if e['event'] == 'rollback']
  assert spikes[:3] == [14, 15, 16]  # (the redone steps may have spikes of their own)
  assert (rollback['step'], rollback['to_step'], rollback['skipped_batches']) == rollback_want
  skipped = rollback_want[2]
  train_records = [r for r in records if 'loss' in r]
  assert [r['step'] for r in train_records] == list(range(1, 21))
  assert all(r['loss'] < 7.0 for r in train_records if r['step'] > 12)  # the spike is gone
  assert train_records[-1]['rollbacks'] == 1 and train_records[-1]['spikes'] == len(spikes)
  assert injector.calls == 20 + skipped + skipped  # 20 steps, those redone, those skipped
  if eval_every:  # evaluated once each, after the rollback: never on the diverged parameters
    assert [r['step'] for r in records if 'eval_loss' in r] == [16, 20]
  # metrics.jsonl holds each step once; the discarded records are kept in a .bak.
  assert [r['step'] for r in read_metrics(str(tmp_path)) if 'loss' in r] == list(range(1, 21))
  assert any(name.startswith('metrics.jsonl.') for name in os.listdir(tmp_path))
  assert checkpoint.committed_steps(checkpoint.directory(str(tmp_path)))[-1] == 20


# --- checkpoints by time, alerts, the summary ---------------------------------------------------


def test_time_based_saves(tmp_path):
  cfg = small_config(**{'checkpoint.every': 0, 'checkpoint.every_minutes': 1 / 60})
  checkpoints = checkpoint.Checkpoints(str(tmp_path), cfg)

  class Batches:
    def get_state(self):
      return {'position': 0}

  state = train_step.TrainState(
    step=jnp.zeros((), jnp.int32), params={'w': jnp.ones(3)}, opt_state={'m': jnp.zeros(3)}
  )
  saved = []
  for step in range(1, 5):
    saved.append(checkpoints.save(step, state, Batches()))
    checkpoints.wait()
    if step % 2 == 0:
      time.sleep(1.2)
  checkpoints.close()
  # Nothing at the start; then one save per second of training.
  assert saved == [False, False, True, False]
  assert checkpoint.committed_steps(checkpoint.directory(str(tmp_path))) == [3]


def test_webhook_rate_limit_and_stall_watchdog(webhook):
  url, received = webhook
  hook = alerts.Webhook(url, 'run-a')
  assert hook.send('first NaN', kind='skipped')
  assert not hook.send('second NaN', kind='skipped')  # the same kind, too soon
  assert hook.send('crashed', kind='crash')
  stalled = []
  watchdog = alerts.StallWatchdog(0.002, stalled.append)  # 0.12 s
  time.sleep(0.6)
  watchdog.close()
  hook.close()
  assert [r['text'] for r in received] == ['[k2jax run-a] first NaN', '[k2jax run-a] crashed']
  assert len(stalled) == 1 and stalled[0] >= 0.002


def test_unreachable_webhook_does_not_stop_the_run(capsys):
  hook = alerts.Webhook('http://127.0.0.1:9/none', 'run-b')
  hook.send('hello')
  hook.close()
  assert 'alert not delivered' in capsys.readouterr().out


@pytest.mark.parametrize(
  'override, message',
  [
    ('monitor.profile_steps=5', "monitor.profile_steps must be 'START:STOP'"),
    ('monitor.profile_steps=4:2', "monitor.profile_steps must be 'START:STOP'"),
    ('monitor.wandb_project=k2', 'wandb is not installed'),
    ('monitor.webhook_url=hooks.slack.com/x', 'must be an http(s) URL'),
    ('stability.spike_patience=-1', 'stability.spike_patience must be an integer >= 0'),
    ('checkpoint.every_minutes=-5', 'checkpoint.every_minutes must be a number >= 0'),
  ],
)
def test_bad_monitor_and_stability_settings(override, message):
  key, value = override.split('=')
  cfg = small_config()
  node = cfg
  *parents, leaf = key.split('.')
  for part in parents:
    node = node[part]
  node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], str) else value
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
    run_config.validate(cfg)


def test_monitor_command_summarises_a_run(demo_run, tmp_path, capsys):
  from k2jax import monitor as monitor_command

  plot = tmp_path / 'summary.png'  # not into the shared run
  assert monitor_command.main([str(demo_run), f'--out={plot}', '--output=json']) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary['step'] == 100 and summary['total_steps'] == 100
  assert summary['checkpoints'] == [50, 100] and summary['rollbacks'] == []
  with open(summary['plot'], 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert monitor_command.main([str(demo_run), f'--out={plot}']) == 0
  text = capsys.readouterr().out
  assert 'step 100 of 100' in text and 'rollbacks none' in text
