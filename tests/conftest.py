"""Tests run on CPU with 8 simulated devices; XLA_FLAGS must be set before jax is imported.

The suite shares a persistent JAX compilation cache (also passed to the commands tests start),
and one trained demo run (`demo_run`), built once however many xdist workers ask for it.
"""

import fcntl
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
  ).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Every program compiled by any test or command is cached on disk: the same train step compiled
# by a dozen CLI runs is compiled once. K2JAX_TEST_CACHE= (empty) turns it off.
_CACHE = os.environ.get('K2JAX_TEST_CACHE', os.path.join(REPO, '.cache', 'jax-tests'))
if _CACHE:
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _CACHE)
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

from tests import helpers  # noqa: E402  (after the environment above)


def pytest_configure(config):
  config.addinivalue_line(
    'markers',
    'slow: end-to-end cases (several processes, SIGKILL, the 70B compile); `make test-fast` '
    'leaves them out, `make test` and CI run them',
  )


def _shared_dir(tmp_path_factory):
  """A directory all xdist workers of this session share (each worker has its own basetemp)."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base


@pytest.fixture(scope='session')
def demo_run(tmp_path_factory):
  """The workdir of `make demo`'s run (100 steps of configs/pretrain.py:debug), trained by the
  CLI once per session and shared by every test: read it, never write into it (copy it first)."""
  shared = _shared_dir(tmp_path_factory)
  path = shared / 'demo_run'
  with open(shared / 'demo_run.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # one worker trains; the others wait, then reuse it
    if not (shared / 'demo_run.done').exists():
      helpers.run_cli(
        'k2jax.train', f'--config={helpers.DEMO_CONFIG}', f'--workdir={path}', check=True
      )
      (shared / 'demo_run.done').touch()
  return path
