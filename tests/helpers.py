"""Helpers shared by the test files: import them from here, never from another test file."""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_TOKENIZER = os.path.join(REPO, 'data_pipeline/demo/tokenizer.model')
DEMO_EVAL = os.path.join(REPO, 'data_pipeline/demo/eval.jsonl')

# The demo run every test that needs a trained model shares (built once a session, conftest.py):
# `make demo`'s command, 100 steps of configs/pretrain.py:debug.
DEMO_CONFIG = 'configs/pretrain.py:debug'
DEMO_STEPS = 100


def cli_env(**extra) -> dict:
  """The environment of a command a test starts: 8 simulated CPU devices and the suite's
  persistent compilation cache (set by conftest.py), so a subprocess reuses what others compiled."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  flags = env.get('XLA_FLAGS', '')
  if '--xla_force_host_platform_device_count' not in flags:
    env['XLA_FLAGS'] = (flags + ' --xla_force_host_platform_device_count=8').strip()
  env.update(extra)
  return env


def run_cli(module: str, *args, check: bool = False, timeout: float = 600, env=None, **popen):
  """`python -m module args...` from the repository root; stdout and stderr captured as text.
  With check=True a non-zero exit fails the test and shows the end of stderr."""
  result = subprocess.run(
    [sys.executable, '-m', module, *map(str, args)],
    cwd=popen.pop('cwd', REPO),
    env=env or cli_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
    **popen,
  )
  if check and result.returncode != 0:
    pytest.fail(f'python -m {module} exited {result.returncode}:\n{result.stderr[-4000:]}')
  return result


def copy_run(src, dst) -> str:
  """A private, writable copy of a shared run directory (the shared one is never modified)."""
  shutil.copytree(src, dst, dirs_exist_ok=True)
  return str(dst)


def require_oracle(module: str):
  """Imports the test oracle (torch, transformers, lm_eval). Locally a missing oracle skips; in
  CI (`CI` set) it fails, so an install step that lost it cannot pass as green."""
  if os.environ.get('CI'):
    try:
      return __import__(module)
    except ImportError as error:
      pytest.fail(f'CI needs the test oracle {module!r} (pip install -e .[dev]): {error}')
  return pytest.importorskip(module)
