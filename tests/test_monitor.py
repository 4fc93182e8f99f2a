"""The monitor's credentials and noise: a webhook URL is never written anywhere, and library
logging stays out of k2jax's own progress lines."""

import os
import sys
import types

import pytest

from k2jax.observe import alerts, logs, monitor
from tests.helpers import run_cli

# A loopback address: no alert may leave the machine, even by mistake.
SECRET = 'http://127.0.0.1:9/services/T000/B000/s3cr3t-token'


def test_webhook_url_from_an_environment_variable(monkeypatch):
  monkeypatch.setenv('K2JAX_TEST_HOOK', SECRET)
  assert alerts.webhook_url('env:K2JAX_TEST_HOOK') == SECRET
  assert alerts.webhook_url(SECRET) == SECRET  # given directly: used, but see redaction
  assert alerts.webhook_url('') is None


@pytest.mark.parametrize(
  'setting, message',
  [
    ('env:K2JAX_UNSET_HOOK', 'the environment variable K2JAX_UNSET_HOOK is not set'),
    ('env:', 'names no environment variable'),
    ('127.0.0.1:9/s3cr3t-token', 'must be an http(s) URL'),
    ('http://127.0.0.1/<redacted>', 'is a redacted URL from a saved config'),
  ],
)
def test_unusable_webhook_settings_are_named_without_the_secret(monkeypatch, setting, message):
  monkeypatch.delenv('K2JAX_UNSET_HOOK', raising=False)
  with pytest.raises(ValueError, match='monitor.webhook_url') as error:
    monitor.check_settings({'webhook_url': setting})
  assert message in str(error.value)
  assert 's3cr3t' not in str(error.value)


def test_redaction_keeps_the_host_and_never_the_path():
  assert alerts.redact(SECRET) == 'http://127.0.0.1/<redacted>'
  assert alerts.redact('env:K2JAX_TEST_HOOK') == 'env:K2JAX_TEST_HOOK'  # a name, no secret
  assert alerts.redact('') == ''
  config = {'seed': 0, 'monitor': {'webhook_url': SECRET, 'stall_minutes': 30}}
  safe = alerts.redacted_config(config)
  assert safe['monitor'] == {
    'webhook_url': 'http://127.0.0.1/<redacted>',
    'stall_minutes': 30,
  }
  assert config['monitor']['webhook_url'] == SECRET  # the run's own config is left as it was


def test_wandb_gets_the_redacted_config(tmp_path, monkeypatch):
  seen = {}
  fake = types.SimpleNamespace(init=lambda **kwargs: seen.update(kwargs) or fake, finish=dict)
  monkeypatch.setitem(sys.modules, 'wandb', fake)
  settings = {'wandb_project': 'k2', 'webhook_url': SECRET, 'stall_minutes': 0}
  config = {'monitor': dict(settings)}
  run = monitor.Monitor(str(tmp_path), 10, 100, settings=settings, config=config)
  run.close()
  assert seen['config']['monitor']['webhook_url'] == 'http://127.0.0.1/<redacted>'


def test_library_log_level(monkeypatch):
  import logging

  monkeypatch.setenv(logs.ENV, 'info')
  assert logs.quiet_libraries() == 'INFO'
  assert logging.getLogger('orbax').level == logging.INFO
  monkeypatch.setenv(logs.ENV, 'loud')
  with pytest.raises(ValueError, match='K2JAX_LOG_LEVEL'):
    logs.quiet_libraries()
  monkeypatch.delenv(logs.ENV)
  assert logs.quiet_libraries() == 'WARNING'


def test_a_run_writes_no_webhook_url_and_no_library_info_lines(tmp_path):
  """A short CLI run with checkpoints, given the webhook URL directly: the URL is in no file of
  the workdir (config.json, checkpoints, metrics), and stderr carries no library INFO lines."""
  result = run_cli(
    'k2jax.train',
    '--config=configs/pretrain.py:debug',
    f'--workdir={tmp_path}',
    '--config.total_steps=2',
    '--config.optim.warmup_steps=1',
    '--config.checkpoint.every=1',
    '--config.eval_every=0',
    f'--config.monitor.webhook_url={SECRET}',
    check=True,
  )
  info = [line for line in result.stderr.splitlines() if line.startswith('I1') or 'INFO' in line]
  assert not info, info[:5]
  files = [os.path.join(d, f) for d, _, names in os.walk(tmp_path) for f in names]
  assert any(f.endswith('config.json') for f in files) and len(files) > 10
  for path in files:
    with open(path, 'rb') as f:
      assert b's3cr3t' not in f.read(), path
