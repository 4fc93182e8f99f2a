"""End to end: the debug pre-training stage learns; the command line fails cleanly on bad input."""

import json
import math
import os
import sys

import ml_collections
import pytest
from absl import flags

from k2jax import train as train_cli
from k2jax.model import config as model_config
from tests.helpers import DEMO_CONFIG, DEMO_STEPS, read_metrics, run_cli

REQUIRED = ('step', 'loss', 'learning_rate', 'grad_norm', 'tokens_per_sec')


def test_debug_pretraining_lowers_the_loss(demo_run):
  """`make demo`'s run (the shared CLI-trained workdir): the loss falls well below a fresh
  model's, evals land every eval_every steps, and metrics, config and TensorBoard are written."""
  cfg = json.loads((demo_run / 'config.json').read_text())
  assert cfg['model']['preset'] == 'debug' and cfg['total_steps'] == DEMO_STEPS
  records = read_metrics(str(demo_run))
  train_records = [r for r in records if 'loss' in r]
  log_every, eval_every = cfg['log_every'], cfg['eval_every']
  assert [r['step'] for r in train_records] == list(range(log_every, DEMO_STEPS + 1, log_every))
  for record in train_records:
    assert all(key in record for key in REQUIRED), record
  # A fresh init predicts about uniformly: a loss of ln(vocab) = ln(2048) = 7.6.
  fresh = math.log(model_config.from_config(ml_collections.ConfigDict(cfg['model'])).vocab_size)
  late = [r['loss'] for r in train_records[-3:]]
  assert max(late) < fresh - 3.0, (fresh, late)  # "well below its start"
  assert max(late) < train_records[0]['loss'], late  # and still falling after the first log
  evals = [r for r in records if 'eval_loss' in r]
  assert [r['step'] for r in evals] == list(range(eval_every, DEMO_STEPS + 1, eval_every))
  assert evals[-1]['eval_loss'] < fresh - 3.0
  assert os.listdir(demo_run / 'tensorboard')


def train_command(*args, capsys) -> tuple[int, str]:
  """`python -m k2jax.train ARGS` in this process (absl's flag parsing, then main), as far as
  it goes before training: (exit status, stderr)."""
  capsys.readouterr()
  argv, sys.argv = sys.argv, ['k2jax.train', *args]  # where config overrides are read from
  try:
    train_cli.main(train_cli.parse_flags(sys.argv))
    status = 0
  except SystemExit as exit_:
    status = exit_.code
  finally:
    sys.argv = argv
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith('config.')]:  # this call's overrides
      delattr(flags.FLAGS, name)
  return status, capsys.readouterr().err


def one_line_error(status, stderr) -> str:
  assert status == 2, stderr
  assert len(stderr.strip().splitlines()) == 1 and 'Traceback' not in stderr, stderr
  assert stderr.startswith('error: '), stderr
  return stderr


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
    (
      '--config.mesh.tensor=3',
      'mesh.data=-1 cannot fill 8 devices: tensor 3 × sequence 1 = 3 does not divide 8',
    ),
    (
      '--config.mesh.data=2',
      'mesh data 2 × tensor 1 × sequence 1 needs 2 devices, but 8 are available',
    ),
    ('--config.mesh.tensor=8', "kv_heads=4) is not divisible by mesh axis 'tensor' of size 8"),
    ('--config.data.train_files=/nonexistent/*.jsonl', '/nonexistent/*.jsonl'),
    ('--config.model.preset=huge', "model.preset='huge' is not one of"),
    ('--num_processes=2', '--coordinator_address, --num_processes and --process_id go together'),
  ],
)
def test_bad_input_is_one_clear_line(override, expected, tmp_path, capsys):
  status, stderr = train_command(
    f'--config={DEMO_CONFIG}', f'--workdir={tmp_path}', override, capsys=capsys
  )
  assert expected in one_line_error(status, stderr), stderr


def test_unknown_config_argument(tmp_path, capsys):
  status, stderr = train_command(
    '--config=configs/midtrain.py:stage9', f'--workdir={tmp_path}', capsys=capsys
  )
  assert 'stage9' in one_line_error(status, stderr) and 'stage1' in stderr


def test_a_stage_without_training_data_says_which_keys_to_set(tmp_path, capsys):
  """The README's stage-3 command: stages 2-4 name no training data (nor a tokenizer)."""
  status, stderr = train_command(
    '--config=configs/midtrain.py:stage3',
    f'--workdir={tmp_path / "mid3"}',
    f'--config.init_from={tmp_path / "mid2"}',
    capsys=capsys,
  )
  one_line_error(status, stderr)
  assert 'this stage names no training data (set data.train_files' in stderr, stderr
  assert 'data.mixture' in stderr and 'no tokenizer (set data.tokenizer' in stderr, stderr
  assert not os.path.exists(tmp_path / 'mid3')  # refused before anything was written


def test_the_command_exits_2_with_one_line(tmp_path):
  """The real command line, once: a mesh that does not fit, refused with status 2, one line
  naming the axes, and on CPU the XLA_FLAGS device count that would fit."""
  result = run_cli(
    'k2jax.train', f'--config={DEMO_CONFIG}', f'--workdir={tmp_path}', '--config.mesh.data=3'
  )
  one_line_error(result.returncode, result.stderr)
  assert 'mesh data 3 × tensor 1 × sequence 1 needs 3 devices, but 8 are available' in (
    result.stderr
  )
  assert 'XLA_FLAGS=--xla_force_host_platform_device_count=3' in result.stderr
