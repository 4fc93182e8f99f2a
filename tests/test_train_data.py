"""End to end: the trainer reads a prepared TxT360-shaped mixture, a Midas-shaped stage folder
and a 3efforts-shaped SFT set (CPU-sized stages, two steps each: the step time on CPU is the
cost; the command line itself is tested by the demo run, tests/conftest.py)."""

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import prepare, sources
from k2jax import run_config
from k2jax.training.run import train
from tests.helpers import REPO

DEMO = os.path.join(REPO, 'data_pipeline', 'demo')
TOKENIZER = os.path.join(DEMO, 'tokenizer.model')


def demo_records():
  with open(os.path.join(DEMO, 'train.jsonl')) as f:
    return [json.loads(line) for line in f]


def short_run(cfg, steps=2):
  cfg.total_steps = steps
  cfg.log_every = 1
  cfg.eval_every = 0
  cfg.checkpoint.every = 0
  cfg.optim.warmup_steps = 1
  return cfg


def test_pretraining_from_a_prepared_txt360_shaped_mixture(tmp_path):
  # TxT360's layout: CommonCrawl by snapshot and duplicate bucket, curated sources beside it.
  records = demo_records()
  layout = {
    'data/common-crawl/CC-MAIN-2024-10/1-1': [
      r for r in records if 'encyclopedia' in r['meta']['source']
    ],
    'data/common-crawl/CC-MAIN-2024-10/2-5': [
      r for r in records if 'stories' in r['meta']['source']
    ],
    'data/math': [r for r in records if 'arithmetic' in r['meta']['source']],
  }
  for folder, part in layout.items():
    os.makedirs(tmp_path / folder)
    with gzip.open(tmp_path / folder / 'part-000.jsonl.gz', 'wt') as f:
      f.writelines(json.dumps(r) + '\n' for r in part)
  for name, pattern in (
    ('cc_1-1', 'data/common-crawl/*/1-1'),
    ('cc_2-5', 'data/common-crawl/*/2-5'),
    ('math', 'data/math'),
  ):
    request = prepare.Request(
      inputs=tuple(sources.match_files(str(tmp_path / pattern))), tokenizer=TOKENIZER
    )
    prepare.prepare(request, str(tmp_path / 'prepared' / name), progress=False)
  # K2-V2's bucket upsampling: 1-1 x2, 2-5 x4, with token counts from the manifests.
  bank = {
    'cc_1-1': {'tokens': 'manifest', 'epochs': 2, 'path': 'prepared/cc_1-1'},
    'cc_2-5': {'tokens': 'manifest', 'epochs': 4, 'path': 'prepared/cc_2-5'},
    'math': {'tokens': 'manifest', 'epochs': 1, 'path': 'prepared/math'},
  }
  (tmp_path / 'bank.json').write_text(json.dumps(bank))

  cfg = short_run(run_config.load(os.path.join(REPO, 'configs/pretrain.py:debug')))
  cfg.data.mixture = str(tmp_path / 'bank.json')
  cfg.data.data_root = str(tmp_path)
  records = train(cfg, str(tmp_path / 'run'))
  assert [r['step'] for r in records] == [1, 2]
  last = records[-1]
  shares = {k: v for k, v in last.items() if k.startswith('data_share/')}
  assert set(shares) == {'data_share/cc_1-1', 'data_share/cc_2-5', 'data_share/math'}
  assert sum(shares.values()) == 1.0 or abs(sum(shares.values()) - 1.0) < 1e-9
  assert all(v > 0.05 for v in shares.values())


def test_midtraining_from_a_midas_shaped_parquet_folder(tmp_path):
  # TxT360-Midas: stageN/<subset>/ parquet files with a text column.
  records = demo_records()
  for subset, part in (('reasoning_behaviors', records[::2]), ('books', records[1::2])):
    os.makedirs(tmp_path / 'stage2' / subset)
    table = pa.table({'text': [r['text'] for r in part], 'id': [r['meta']['id'] for r in part]})
    pq.write_table(table, tmp_path / 'stage2' / subset / 'train-00000.parquet')
  cfg = short_run(run_config.load(os.path.join(REPO, 'configs/midtrain.py:stage2,debug')))
  cfg.data.train_files = str(tmp_path / 'stage2')
  records = train(cfg, str(tmp_path / 'run'))
  assert len(records) == 2 and all(r['loss'] > 0 for r in records)
  assert 0 < records[-1]['data_pad_fraction'] < 0.1  # best-fit packing of whole documents


def test_sft_on_3efforts_shaped_conversations(tmp_path):
  cfg = short_run(run_config.load(os.path.join(REPO, 'configs/sft.py:debug')))
  cfg.eval_every = 2
  records = train(cfg, str(tmp_path))
  with open(tmp_path / 'metrics.jsonl') as f:
    assert [json.loads(line) for line in f] == records
  steps = [r for r in records if 'loss' in r]
  assert [r['step'] for r in steps] == [1, 2]
  # Loss only on assistant tokens: far fewer than the 8 x 512 slots of a batch.
  assert all(0 < r['loss_tokens'] < 0.8 * 8 * 512 for r in steps)
  assert any('eval_loss' in r for r in records)
