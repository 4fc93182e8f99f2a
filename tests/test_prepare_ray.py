"""data_pipeline.prepare --engine=ray: the local engine's bytes, resuming, clear errors."""

import json
import os

from data_pipeline import prepare, prepare_ray, sources
from tests.helpers import DEMO_TOKENIZER, REPO, require_oracle, run_cli

DEMO_TRAIN = os.path.join(REPO, 'data_pipeline', 'demo', 'train.jsonl')


def write_parts(directory, parts=3, docs=240) -> str:
  """The first `docs` demo documents round-robin into `parts` JSONL files (one shard each)."""
  texts = sources.read_values(DEMO_TRAIN, 'text').values[:docs]
  os.makedirs(directory, exist_ok=True)
  for i in range(parts):
    with open(os.path.join(directory, f'part-{i}.jsonl'), 'w') as f:
      f.writelines(json.dumps({'text': t}) + '\n' for t in texts[i::parts])
  return str(directory)


def tree_bytes(directory) -> dict[str, bytes]:
  found = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        found[os.path.relpath(path, directory)] = f.read()
  return found


def test_two_ray_workers_write_the_local_engines_bytes_and_skip_finished_shards(tmp_path):
  require_oracle('ray')  # the dev extra installs it; CI fails without it
  inputs = write_parts(tmp_path / 'inputs')
  local, distributed = tmp_path / 'local', tmp_path / 'ray'
  request = prepare.Request(
    inputs=tuple(sources.match_files(inputs)), tokenizer=os.path.abspath(DEMO_TOKENIZER)
  )
  prepare.prepare(request, str(local), workers=1, progress=False)
  expected = tree_bytes(local)
  assert {'manifest.json', 'prepare.json', 'shards/00002.array_record'} <= set(expected)
  # A run killed after one shard: its files are there, and must not be written again.
  os.makedirs(distributed / 'shards')
  for name in ('prepare.json', 'shards/00001.array_record', 'shards/00001.json'):
    (distributed / name).write_bytes(expected[name])
  old = 1_000_000_000
  os.utime(distributed / 'shards/00001.array_record', (old, old))
  result = run_cli(
    'data_pipeline.prepare',
    f'--input={inputs}',
    f'--tokenizer={DEMO_TOKENIZER}',
    f'--output={distributed}',
    '--engine=ray',
    '--workers=2',
    check=True,
    env=dict(os.environ, RAY_USAGE_STATS_ENABLED='0'),
  )
  assert 'in 3 shard(s)' in result.stdout
  assert '1/3' in result.stderr and '3/3' in result.stderr, result.stderr[-2000:]  # progress
  assert tree_bytes(distributed) == expected
  assert os.stat(distributed / 'shards/00001.array_record').st_mtime == old


def test_bad_engine_arguments_are_one_line(tmp_path, capsys, monkeypatch):
  inputs = write_parts(tmp_path / 'inputs', parts=1, docs=3)
  common = [f'--input={inputs}', f'--tokenizer={DEMO_TOKENIZER}', f'--output={tmp_path / "o"}']
  assert prepare.main([*common, '--engine=ray', '--retries=-1']) == 2
  assert 'error: --retries must be >= 0, got -1' in capsys.readouterr().err
  assert prepare.main([*common, '--workers=0']) == 2
  assert 'error: --workers must be >= 1, got 0' in capsys.readouterr().err
  # Without Ray installed: said before anything is written.
  monkeypatch.setattr(prepare_ray.importlib.util, 'find_spec', lambda name: None)
  assert prepare.main([*common, '--engine=ray']) == 2
  assert "error: --engine=ray needs Ray: pip install 'k2jax[ray]'" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'o')


def test_a_task_that_fails_with_an_io_error_is_retried(tmp_path, monkeypatch):
  """The first try of every shard raises OSError (as a flaky shared filesystem would); with
  one retry the run still writes the local engine's bytes."""
  require_oracle('ray')
  inputs = write_parts(tmp_path / 'inputs', parts=2, docs=40)
  request = prepare.Request(
    inputs=tuple(sources.match_files(inputs)), tokenizer=os.path.abspath(DEMO_TOKENIZER)
  )
  prepare.prepare(request, str(tmp_path / 'local'), workers=1, progress=False)
  tries = tmp_path / 'tries'  # one file per failed first try, shared with the Ray workers
  tries.mkdir()
  real = prepare.prepare_shard

  def flaky(request, output, index):
    marker = os.path.join(tries, f'{index}')
    if not os.path.exists(marker):
      open(marker, 'w').close()
      raise OSError(f'injected: first try of shard {index}')
    return real(request, output, index)

  monkeypatch.setenv('RAY_USAGE_STATS_ENABLED', '0')
  monkeypatch.setattr(prepare, 'prepare_shard', flaky)
  out = tmp_path / 'ray'
  prepare.prepare(request, str(out), workers=2, progress=False, engine='ray', retries=1)
  assert sorted(os.listdir(tries)) == ['0', '1']  # every shard failed once
  assert tree_bytes(out) == tree_bytes(tmp_path / 'local')
