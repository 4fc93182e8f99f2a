"""Every stage config loads, validates and carries K2-V2's numbers (docs/recipe.md)."""

import json
import os

import pytest

from k2jax import run_config
from k2jax.model import config as model_config
from tests.helpers import REPO

SPECS = ['configs/pretrain.py', 'configs/sft.py'] + [
  f'configs/midtrain.py:stage{i}' for i in range(1, 5)
]


def load(spec):
  cfg = run_config.load(os.path.join(REPO, spec))
  run_config.validate(cfg)
  return cfg


@pytest.mark.parametrize('spec', SPECS + [s + (',debug' if ':' in s else ':debug') for s in SPECS])
def test_every_stage_config_loads_and_validates(spec):
  cfg = load(spec)
  for key in run_config.CONTRACT_KEYS:
    assert run_config.has_key(cfg, key), key
  model = model_config.from_config(cfg.model)
  assert model.num_layers > 0


def test_pretraining_numbers():
  cfg = load('configs/pretrain.py')
  model = model_config.from_config(cfg.model)
  assert (model.num_layers, model.hidden_size, model.ffn_size) == (80, 8192, 28672)
  assert (model.num_heads, model.num_kv_heads, model.head_dim) == (64, 8, 128)
  assert model.vocab_size == 250112 and model.norm_eps == 1e-5 and model.norm_one_plus
  assert (cfg.data.seq_len, cfg.data.global_batch_size, cfg.total_steps) == (8192, 1200, 1_250_000)
  assert (cfg.optim.peak_lr, cfg.optim.b1, cfg.optim.b2, cfg.optim.eps) == (1.5e-4, 0.9, 0.95, 1e-8)
  assert (cfg.optim.weight_decay, cfg.optim.clip_norm, cfg.optim.schedule) == (0.05, 1.0, 'cosine')
  assert (cfg.mesh.tensor, cfg.mesh.sequence, cfg.model.remat) == (8, 1, 'full')
  assert cfg.model.dtype == 'bfloat16' and cfg.model.param_dtype == 'float32'


@pytest.mark.parametrize(
  'stage,seq_len,rope,batch,steps,cp',
  [
    (1, 8_192, 5e5, 1600, 135_000, 1),
    (2, 65_536, 1e6, 200, 45_000, 1),
    (3, 131_072, 1e7, 100, 17_500, 2),
    (4, 524_288, 1e7, 25, 10_000, 8),
  ],
)
def test_midtraining_stages(stage, seq_len, rope, batch, steps, cp):
  cfg = load(f'configs/midtrain.py:stage{stage}')
  assert (cfg.data.seq_len, cfg.model.rope_base, cfg.data.global_batch_size) == (
    seq_len,
    rope,
    batch,
  )
  assert (cfg.total_steps, cfg.mesh.sequence, cfg.mesh.tensor) == (steps, cp, 8)
  assert abs(seq_len * batch - 13.1e6) / 13.1e6 < 0.03  # ~13.1M tokens per step
  if stage == 1:
    assert (cfg.optim.schedule, cfg.optim.peak_lr, cfg.optim.min_lr) == ('cosine', 1.5e-5, 6e-6)
    assert cfg.optim.warmup_steps == 500 and cfg.data.packing == 'concat'
  else:
    assert (cfg.optim.schedule, cfg.optim.peak_lr) == ('constant', 6e-6)
    assert cfg.data.packing == 'best_fit'

  debug = load(f'configs/midtrain.py:stage{stage},debug')
  assert debug.model.preset == 'debug'
  assert debug.model.rope_base == rope  # the stage's character survives shrinking
  assert debug.optim.schedule == cfg.optim.schedule
  assert debug.data.packing == cfg.data.packing and debug.mesh.sequence == cp
  pretrain_debug = load('configs/pretrain.py:debug')
  assert debug.data.seq_len >= pretrain_debug.data.seq_len
  if stage == 4:
    assert debug.data.seq_len == 16 * pretrain_debug.data.seq_len


def test_sft_numbers():
  cfg = load('configs/sft.py')
  assert (cfg.data.seq_len, cfg.data.global_batch_size) == (32_768, 1024)
  assert (cfg.optim.peak_lr, cfg.optim.clip_norm, cfg.optim.schedule) == (2e-5, 0.5, 'cosine')
  assert cfg.optim.warmup_steps == round(0.05 * cfg.total_steps)
  assert cfg.data.packing == 'best_fit'


def test_config_arguments_are_checked():
  with pytest.raises(ValueError, match='exactly one of stage1, stage2, stage3, stage4'):
    run_config.load(os.path.join(REPO, 'configs/midtrain.py'))
  with pytest.raises(ValueError, match='unknown config argument'):
    run_config.load(os.path.join(REPO, 'configs/pretrain.py:tiny'))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    run_config.load('configs/nope.py')


def test_validation_names_the_key():
  cfg = load('configs/pretrain.py:debug')
  cfg.optim.grad_accum_steps = 3
  with pytest.raises(
    ValueError, match='global_batch_size=16 is not divisible by optim.grad_accum_steps=3'
  ):
    run_config.validate(cfg)
  cfg = load('configs/pretrain.py:debug')
  cfg.mesh.sequence = 0
  with pytest.raises(ValueError, match='mesh.sequence must be a positive integer or -1'):
    run_config.validate(cfg)
  cfg = load('configs/pretrain.py:debug')
  cfg.model.num_layers = -2
  with pytest.raises(ValueError, match='model.num_layers must be a positive integer'):
    run_config.validate(cfg)


def test_data_banks_carry_the_published_mixtures():
  from data_pipeline import mixture

  pretrain = load('configs/pretrain.py')
  shares = {s.name: s.share for s in mixture.load_data_bank(pretrain.data.mixture, '/data')}
  assert sum(shares.values()) == pytest.approx(1.0)
  assert (shares['cc_drop'], shares['cc_keep'], shares['txt360_qa']) == pytest.approx(
    (0.302, 0.272, 0.158)
  )
  assert (shares['opencoder'], shares['opencoder_fim'], shares['wikipedia']) == pytest.approx(
    (0.071, 0.065, 0.009)
  )
  stage1 = load('configs/midtrain.py:stage1')
  shares = {s.name: s.share for s in mixture.load_data_bank(stage1.data.mixture, '/data')}
  assert (shares['web_sample'], shares['math'], shares['books']) == pytest.approx(
    (0.28, 0.24, 0.10)
  )
  code = shares['code'] + shares['code_fim'] + shares['code_topo_sorted']
  assert code == pytest.approx(0.12)
  assert all(
    s.path.startswith('/data/') for s in mixture.load_data_bank(stage1.data.mixture, '/data')
  )
  assert load('configs/midtrain.py:stage2').data.mixture == ''  # not public: set per run
  sft = load('configs/sft.py')
  assert sft.data.format == 'chat'
  with open(sft.data.mixture) as f:
    bank = json.load(f)
  assert bank['identity_safety']['epochs'] == 4 * bank['3efforts']['epochs']  # repeated x4


def test_debug_stages_read_the_demo_data():
  sft = load('configs/sft.py:debug')
  assert sft.data.mixture == '' and sft.data.train_files.endswith('sft/train.parquet')
  assert sft.data.format == 'chat'
  assert load('configs/pretrain.py:debug').data.mixture == ''
