"""Mid-training stage 2 (packed documents, best-fit) trains to the same losses with every
linear-memory backend as with the dense reference, from the command line, on a data 4 x
tensor 2 mesh (so the Pallas kernel runs per device, each on its own rows and heads)."""

import pytest

from tests.helpers import read_metrics, run_cli

STEPS = 3
FLAGS = (
  '--config=configs/midtrain.py:stage2,debug',
  f'--config.total_steps={STEPS}',
  '--config.log_every=1',
  '--config.eval_every=0',
  '--config.checkpoint.every=0',
  '--config.model.num_layers=2',
  '--config.mesh.tensor=2',
)


def losses(tmp_path, backend):
  workdir = tmp_path / backend
  result = run_cli(
    'k2jax.train', *FLAGS, f'--workdir={workdir}', f'--config.model.attention={backend}', check=True
  )
  assert f'attention {backend}: as configured' in result.stdout + result.stderr
  return [r['loss'] for r in read_metrics(workdir) if 'loss' in r]


@pytest.mark.slow
def test_stage2_trains_alike_with_every_backend(tmp_path):
  reference = losses(tmp_path, 'xla')
  assert len(reference) == STEPS
  for backend in ('blockwise', 'pallas'):
    got = losses(tmp_path, backend)
    assert got == pytest.approx(reference, rel=2e-3), backend
