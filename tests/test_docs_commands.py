"""Every command in the ```bash blocks of docs/multihost.md and docs/recipe.md is checked, cheaply:

- `python -m k2jax.train`, and the trainer arguments of `launch/run.sh`, `launch.local` and
  `sbatch launch/slurm.sbatch`: the config loads with its overrides and validates (what the run
  checks before it compiles anything);
- `sbatch launch/slurm.sbatch ...`: the batch script runs under a fake `srun` on 2 "nodes" in
  dry-run mode (each node prints its layout and command);
- `launch/run.sh`: runs in dry-run mode with the command's environment;
- `python -m launch.gpu_flags`, `k2jax.estimate --dry_run`, `launch.finished`: run for real;
- the other argparse commands (`data_pipeline.prepare`, `k2jax.convert`, `k2jax.generate`, ...):
  parsed by their own parsers, so a renamed or misspelt flag fails here;
- `kubectl apply -f FILE`: the manifest exists and is a JobSet; `hf download`: each option is
  one `hf download --help` lists; `pip install`: the constraints file and the extras exist.

A command no rule covers fails the test: add a rule here with the new command.
"""

import argparse
import functools
import importlib
import importlib.metadata
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.helpers import REPO, cli_env, fake_slurm

DOCS = ('docs/multihost.md', 'docs/recipe.md')
ASSIGNMENT = re.compile(r'^[A-Z_][A-Z0-9_]*=')


def doc_commands(path):
  """(line number, tokens) of each command in the file's ```bash blocks."""
  with open(os.path.join(REPO, path)) as f:
    lines = f.read().splitlines()
  commands, inside, pending, start = [], False, '', 0
  for number, line in enumerate(lines, 1):
    if line.strip().startswith('```'):
      inside = line.strip() == '```bash'
      continue
    if not inside:
      continue
    if not pending:
      start = number
    if line.rstrip().endswith('\\'):
      pending += line.rstrip()[:-1] + ' '
      continue
    tokens = shlex.split(pending + line, comments=True)
    pending = ''
    if tokens:
      commands.append((start, tokens))
  return commands


CASES = [(path, number, tokens) for path in DOCS for number, tokens in doc_commands(path)]


def test_the_docs_have_commands():
  assert {path for path, _, _ in CASES} == set(DOCS)
  assert len(CASES) >= 20


# --- checks ----------------------------------------------------------------------------------


def check_trainer_args(args, env):
  """k2jax.train's own flag parsing and config validation, without training."""
  from absl import flags
  from ml_collections import config_flags

  from k2jax import run_config

  argv = ['k2jax.train', *args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=values, sys_argv=argv)
  flags.DEFINE_string('workdir', None, '', flag_values=values)
  flags.DEFINE_string('coordinator_address', None, '', flag_values=values)
  flags.DEFINE_integer('num_processes', None, '', flag_values=values)
  flags.DEFINE_integer('process_id', None, '', flag_values=values)
  flags.DEFINE_bool('distributed', False, '', flag_values=values)
  cwd, saved = os.getcwd(), dict(os.environ)
  try:
    os.chdir(REPO)
    os.environ.update(env)
    rest = run_config.parse_flags(values, argv)
    assert rest == ['k2jax.train'], f'unexpected arguments {rest[1:]}'
    assert values.config is not None and values.workdir, 'needs --config and --workdir'
    run_config.validate(values.config)
  finally:
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(saved)


class _Parsed(Exception):
  pass


def check_argparse(module_name, args, monkeypatch):
  """The module's own argparse parser accepts `args` (its `parse_args(argv)` when it has one,
  with its checks after parsing; else `main(argv)` stopped right after parsing)."""
  module = importlib.import_module(module_name)
  if hasattr(module, 'parse_args'):
    module.parse_args(list(args))
    return
  original = argparse.ArgumentParser.parse_args

  def parse_then_stop(self, argv=None, namespace=None):
    raise _Parsed(original(self, argv, namespace))

  monkeypatch.setattr(argparse.ArgumentParser, 'parse_args', parse_then_stop)
  with pytest.raises(_Parsed):
    module.main(list(args))


def run(command, env=None, check=True):
  result = subprocess.run(
    command,
    cwd=REPO,
    env=cli_env(PYTHON=sys.executable, **(env or {})),
    capture_output=True,
    text=True,
    timeout=300,
  )
  if check:
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  return result


@functools.cache
def hf_download_options() -> set[str]:
  hf = os.path.join(os.path.dirname(sys.executable), 'hf')
  help_text = run([hf, 'download', '--help']).stdout
  return set(re.findall(r'--[a-z][a-z-]*', help_text))


def check_python_module(module, args, env, monkeypatch):
  if module == 'k2jax.train':
    check_trainer_args(args, env)
  elif module == 'launch.local':
    from launch import local

    check_trainer_args(local.parse(list(args)).command, env)
  elif module == 'launch.gpu_check':
    from launch import gpu_check

    gpu_check.parser().parse_args(list(args))  # its --dry_run runs in tests/test_launch.py
  elif module in ('launch.gpu_flags', 'launch.finished') or (
    module == 'k2jax.estimate' and '--dry_run' in args
  ):
    result = run([sys.executable, '-m', module, *args], env, check=module != 'launch.finished')
    assert result.returncode in (0, 1) and result.stdout.strip(), result.stderr[-2000:]
  elif module == 'k2jax.estimate':
    from k2jax import estimate, run_config

    values = estimate._define_flags(['estimate', *args])
    run_config.parse_flags(values, ['estimate', *args])
  else:
    check_argparse(module, args, monkeypatch)


def check_sbatch(args, env, tmp_path):
  options = {}
  while args and args[0].startswith('-'):
    key, _, value = args.pop(0).partition('=')
    options[key] = value
  assert args[0] == 'launch/slurm.sbatch', args
  nodes = int(options.get('--nodes', 2))
  assert nodes >= 1
  config, workdir, *overrides = args[1:]
  check_trainer_args([f'--config={config}', f'--workdir={workdir}', *overrides], env)
  # The job itself, on 2 fake nodes, writing into a temporary workdir.
  local_workdir = tmp_path / 'workdir'
  result, calls = fake_slurm(
    tmp_path,
    [config, local_workdir, *overrides],
    nodes=2,
    K2JAX_DRY_RUN='1',
    K2JAX_GPU_PRESET='none',  # the presets are checked by tests/test_launch.py
    **env,
  )
  assert result.returncode == 0 and calls == [], result.stderr[-2000:]
  for node in range(2):
    log = (local_workdir / 'logs' / '4242-0' / f'node-{node}.log').read_text()
    assert f'layout: process {node} of 2 (slurm)' in log and '-m k2jax.train --distributed' in log


def check_command(tokens, tmp_path, monkeypatch):
  env = {}
  while tokens and ASSIGNMENT.match(tokens[0]):
    name, _, value = tokens.pop(0).partition('=')
    env[name] = value
  head = tokens[0]
  if head == 'python' and tokens[1] == '-m':
    check_python_module(tokens[2], tokens[3:], env, monkeypatch)
  elif head == 'launch/run.sh':
    out = run(['launch/run.sh', *tokens[1:]], {**env, 'K2JAX_DRY_RUN': '1'}).stdout
    assert out.startswith('layout: ') and 'command: ' in out, out
    check_trainer_args(tokens[1:], env)
  elif head == 'sbatch':
    check_sbatch(tokens[1:], env, tmp_path)
  elif head == 'kubectl':
    assert tokens[1:3] == ['apply', '-f'], tokens
    yaml = pytest.importorskip('yaml')
    with open(os.path.join(REPO, tokens[3])) as f:
      assert yaml.safe_load(f)['kind'] == 'JobSet'
  elif head == 'hf':
    assert tokens[1] == 'download'
    used = {t.split('=')[0] for t in tokens[2:] if t.startswith('--')}
    assert used <= hf_download_options(), used - hf_download_options()
  elif head == 'pip':
    assert tokens[1] == 'install'
    assert os.path.isfile(os.path.join(REPO, tokens[tokens.index('-c') + 1]))
    extras = re.search(r'\[(.*)\]', tokens[tokens.index('-e') + 1]).group(1).split(',')
    provided = set(importlib.metadata.metadata('k2jax').get_all('Provides-Extra') or ())
    assert set(extras) <= provided, set(extras) - provided
  else:
    pytest.fail(f'no check for {head!r}: add a rule to tests/test_docs_commands.py')


@pytest.mark.parametrize(
  'path, number, tokens', CASES, ids=[f'{p.split("/")[-1]}:{n}' for p, n, _ in CASES]
)
def test_doc_command(path, number, tokens, tmp_path, monkeypatch):
  try:
    check_command(list(tokens), tmp_path, monkeypatch)
  except SystemExit as error:  # a parser's exit 2 (its message is on stderr)
    pytest.fail(f'{path}:{number}: {shlex.join(tokens)[:200]} exited {error.code}')
