"""End to end: the debug pre-training stage learns; the command line fails cleanly on bad input."""

import json
import os
import subprocess
import sys

import pytest

from k2jax import run_config, train
from tests.conftest import REPO

REQUIRED = ('step', 'loss', 'learning_rate', 'grad_norm', 'tokens_per_sec')


def test_debug_pretraining_lowers_the_loss(tmp_path):
  cfg = run_config.load(os.path.join(REPO, 'configs/pretrain.py:debug'))
  cfg.log_every = 1
  records = train.train(cfg, str(tmp_path))

  train_records = [r for r in records if 'loss' in r]
  assert [r['step'] for r in train_records] == list(range(1, 101))
  first = train_records[0]['loss']
  assert first > 7.0  # ~ln(2048) from a fresh init
  late = [r['loss'] for r in train_records[-10:]]
  assert max(late) < first - 3.0, (first, late)  # "well below its start"
  evals = [r for r in records if 'eval_loss' in r]
  assert [r['step'] for r in evals] == [50, 100]
  assert evals[-1]['eval_loss'] < first - 3.0

  with open(tmp_path / 'metrics.jsonl') as f:
    written = [json.loads(line) for line in f]
  assert written == records
  for record in written[1:]:
    if 'loss' in record:
      assert all(key in record for key in REQUIRED), record
  assert json.loads((tmp_path / 'config.json').read_text())['model']['preset'] == 'debug'
  assert os.listdir(tmp_path / 'tensorboard')


def run_cli(*args, tmp_path):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  return subprocess.run(
    [sys.executable, '-m', 'k2jax.train', f'--workdir={tmp_path}', *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.parametrize(
  'override,expected',
  [
    (
      '--config.optim.peak_lrr=1e-3',
      "unknown config key 'optim.peak_lrr'"
      " in '--config.optim.peak_lrr=1e-3'; did you mean: "
      'optim.peak_lr',
    ),
    ('--config.peak_lr=1e-3', 'did you mean: optim.peak_lr'),
    ('--config.optim.peak_lr=fast', "could not convert string to float: 'fast'"),
    ('--config.optim.schedule=cosin', "optim.schedule='cosin'"),
    ('--config.mesh.tensor=3', 'mesh.data=-1 cannot fill 8 devices'),
    ('--config.mesh.tensor=8', "kv_heads=4) is not divisible by mesh axis 'tensor' of size 8"),
    ('--config.data.train_files=/nonexistent/*.jsonl', '/nonexistent/*.jsonl'),
    ('--config.model.preset=huge', "model.preset='huge' is not one of"),
  ],
)
def test_bad_input_is_one_clear_line(override, expected, tmp_path):
  result = run_cli('--config=configs/pretrain.py:debug', override, tmp_path=tmp_path)
  assert result.returncode == 2, result.stderr
  assert expected in result.stderr, result.stderr
  assert 'Traceback' not in result.stderr, result.stderr


def test_unknown_config_argument(tmp_path):
  result = run_cli('--config=configs/midtrain.py:stage9', tmp_path=tmp_path)
  assert result.returncode != 0
  assert 'stage9' in result.stderr and 'stage1' in result.stderr
