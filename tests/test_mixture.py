"""Mixtures, prepared and chat sources through the pipeline: shares, resume, hosts, masks."""

import collections
import json
import logging
import os
import re

import ml_collections
import numpy as np
import pytest

from data_pipeline import chat, mixture, pipeline, prepare, sources
from data_pipeline.tokenizer import load_tokenizer
from tests.helpers import REPO

DEMO = os.path.join(REPO, 'data_pipeline', 'demo')
TOKENIZER = os.path.join(DEMO, 'tokenizer.model')
SHARES = {'encyclopedia': 0.5, 'stories': 0.3, 'arithmetic': 0.2}


def make_cfg(**overrides) -> ml_collections.ConfigDict:
  fields = dict(
    seq_len=128,
    global_batch_size=8,
    train_files='',
    mixture='',
    data_root='',
    eval_files='',
    tokenizer=TOKENIZER,
    packing='concat',
    worker_count=0,
  )
  return ml_collections.ConfigDict({**fields, **overrides})


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """The demo documents split by kind into raw JSONL sources and prepared directories."""
  root = tmp_path_factory.mktemp('corpus')
  by_kind = collections.defaultdict(list)
  with open(os.path.join(DEMO, 'train.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      by_kind[record['meta']['source'].split('/')[1]].append(line)
  for kind in SHARES:
    os.makedirs(root / 'raw' / kind)
    (root / 'raw' / kind / 'part-0.jsonl').write_text(''.join(by_kind[kind]))
    prepare.prepare(
      prepare.Request(inputs=(str(root / 'raw' / kind / 'part-0.jsonl'),), tokenizer=TOKENIZER),
      str(root / 'prepared' / kind),
      progress=False,
    )
  for form in ('raw', 'prepared'):
    bank = {
      kind: {'weight': share * 10, 'path': f'{form}/{kind}'} for kind, share in SHARES.items()
    }
    (root / f'{form}_bank.json').write_text(json.dumps(bank))
  return root


# --- the data-bank file ------------------------------------------------------------


def write_bank(tmp_path, bank) -> str:
  path = tmp_path / 'bank.json'
  path.write_text(bank if isinstance(bank, str) else json.dumps(bank))
  return str(path)


def test_data_bank_forms_and_paths(tmp_path):
  path = write_bank(
    tmp_path,
    {
      'a': [300, 2, 'web'],
      'b': {'tokens': 200, 'path': '/abs/b'},
      'c': {'tokens': 100, 'epochs': 2, 'path': 'gs://bucket/c'},
    },
  )
  a, b, c = mixture.load_data_bank(path)
  assert (a.name, a.share, a.path) == ('a', 0.6, str(tmp_path / 'web'))
  assert (b.share, b.path) == (0.2, '/abs/b')
  assert (c.share, c.path) == (0.2, 'gs://bucket/c')
  [a, *_] = mixture.load_data_bank(path, data_root='/data/txt360')
  assert a.path == '/data/txt360/web'
  weights = mixture.load_data_bank(
    write_bank(
      tmp_path,
      {'x': {'weight': 3, 'path': 'x'}, 'y': {'weight': 1, 'path': 'y', 'system_prompt_prob': 0.5}},
    )
  )
  assert [(s.share, s.system_prompt_prob) for s in weights] == [(0.75, None), (0.25, 0.5)]


def test_data_bank_tokens_from_a_manifest(corpus):
  bank = {
    kind: {
      'tokens': 'manifest',
      'epochs': 2 if kind == 'stories' else 1,
      'path': f'prepared/{kind}',
    }
    for kind in SHARES
  }
  path = corpus / 'manifest_bank.json'
  path.write_text(json.dumps(bank))
  tokens = {k: prepare.read_manifest(str(corpus / 'prepared' / k))['tokens'] for k in SHARES}
  weighted = {k: n * (2 if k == 'stories' else 1) for k, n in tokens.items()}
  shares = {s.name: s.share for s in mixture.load_data_bank(str(path))}
  assert shares == pytest.approx({k: w / sum(weighted.values()) for k, w in weighted.items()})


@pytest.mark.parametrize(
  'bank, message',
  [
    ('{"a": [1, 2', 'not valid JSON'),
    ('[]', 'expected a non-empty object'),
    ({'a': [1, 2]}, "source 'a': expected [tokens, epochs, path]"),
    ({'a': [0, 1, 'p']}, "source 'a': tokens must be > 0"),
    ({'a': ['many', 1, 'p']}, "source 'a': tokens must be a number"),
    ({'a': {'weight': 1}}, "source 'a': path must be a non-empty string"),
    ({'a': {'weight': 1, 'path': 'p', 'tokens': 3}}, 'either weight or tokens'),
    ({'a': {'path': 'p'}}, 'needs tokens'),
    ({'a': {'weight': 1, 'path': 'p', 'wieght': 2}}, 'unknown key(s) wieght'),
    ({'a': {'weight': 1, 'path': 'p', 'system_prompt_prob': 2}}, 'system_prompt_prob must be in'),
    ({'a': {'weight': 1, 'path': 'p'}, 'b': [1, 1, 'q']}, 'use one form'),
    ({'a': {'tokens': 'manifest', 'path': 'nowhere'}}, 'not a prepared data directory'),
  ],
)
def test_data_bank_errors_name_the_file_and_source(tmp_path, bank, message):
  path = write_bank(tmp_path, bank)
  with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)) as error:
    mixture.load_data_bank(path)
  assert 'nowhere' in str(error.value) or path in str(error.value)


def test_missing_data_bank_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='data.mixture'):
    pipeline.build(make_cfg(mixture=str(tmp_path / 'none.json')), seed=0, split='train')


# --- mixing ------------------------------------------------------------------------


@pytest.mark.parametrize('form, packing', [('prepared', 'concat'), ('raw', 'best_fit')])
def test_realised_token_shares_match_the_bank(corpus, form, packing):
  cfg = make_cfg(mixture=str(corpus / f'{form}_bank.json'), packing=packing, pack_buffer=64)
  batches = pipeline.build(cfg, seed=0, split='train')
  assert batches.names == list(SHARES)
  assert batches.requested_shares == pytest.approx(list(SHARES.values()))
  counts = np.zeros(3)
  for batch in take(batches, 120):
    counted = batch['source_ids'][batch['loss_mask'] > 0]
    counts += np.bincount(counted, minlength=3)
  realised = batches.realised_shares()
  assert list(realised.values()) == pytest.approx(list(counts / counts.sum()))
  # 120 x 8 x 128 tokens: documents are ~100-200 tokens, so a few percent of noise.
  assert list(realised.values()) == pytest.approx(list(SHARES.values()), abs=0.03)


def test_mixture_resumes_mid_stream_like_the_uninterrupted_one(corpus):
  cfg = make_cfg(mixture=str(corpus / 'prepared_bank.json'), packing='best_fit', pack_buffer=32)
  uninterrupted = pipeline.build(cfg, seed=3, split='train')
  expected = take(uninterrupted, 12)
  first = pipeline.build(cfg, seed=3, split='train')
  take(first, 5)
  state = json.loads(json.dumps(first.get_state()))  # as a checkpoint stores it
  resumed = pipeline.build(cfg, seed=3, split='train')
  resumed.set_state(state)
  for want, got in zip(expected[5:], take(resumed, 7)):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
  np.testing.assert_array_equal(resumed.source_tokens, uninterrupted.source_tokens)


def test_restoring_under_another_process_count_is_refused(corpus):
  cfg = make_cfg(mixture=str(corpus / 'prepared_bank.json'))
  one = pipeline.build(cfg, seed=0, split='train')
  next(one)
  two = pipeline.build(cfg, seed=0, split='train', process_index=0, process_count=2)
  with pytest.raises(ValueError, match='saved with data.process_count=1 and this run has 2'):
    two.set_state(one.get_state())


def test_processes_read_disjoint_parts_of_every_source(corpus):
  # Rows of 512 hold whole demo documents (at most 511 tokens).
  cfg = make_cfg(mixture=str(corpus / 'prepared_bank.json'), packing='document', seq_len=512)
  seen = []
  for index in range(2):
    batches = pipeline.build(cfg, seed=0, split='train', process_index=index, process_count=2)
    rows = set()
    for batch in take(batches, 30):
      for inputs, segments in zip(batch['inputs'], batch['segment_ids']):
        for s in range(1, segments.max() + 1):
          rows.add(tuple(inputs[segments == s]))
    seen.append(rows)
  # The templated demo corpus repeats a few short documents verbatim; those may be in both.
  tokenizer = load_tokenizer(TOKENIZER)
  counts = collections.Counter(
    tuple(tokenizer.encode(t) + [tokenizer.eos_id])
    for t in sources.read_values(os.path.join(DEMO, 'train.jsonl'), 'text').values
  )
  repeated = {doc for doc, n in counts.items() if n > 1}
  shared = {tuple(int(t) for t in doc) for doc in seen[0] & seen[1]}
  assert len(seen[0]) > 50 and len(seen[1]) > 50
  assert shared <= repeated


def test_single_source_reports_no_shares():
  cfg = make_cfg(train_files=os.path.join(DEMO, 'eval.jsonl'))
  batches = pipeline.build(cfg, seed=0, split='train')
  next(batches)
  assert list(batches.realised_shares()) == ['eval.jsonl']


# --- chat sources --------------------------------------------------------------------


@pytest.mark.parametrize('form', ['raw', 'prepared'])
def test_chat_samples_are_packed_with_assistant_only_loss(tmp_path, form):
  path = os.path.join(DEMO, 'sft', 'eval.parquet')
  if form == 'prepared':
    prepare.prepare(
      prepare.Request(
        inputs=(path,), tokenizer=TOKENIZER, format='chat', field='conversations', max_len=256
      ),
      str(tmp_path / 'p'),
      progress=False,
    )
    path = str(tmp_path / 'p')
  cfg = make_cfg(
    eval_files=path,
    format='chat',
    seq_len=256,
    packing='document',
    chat={'system_prompt_prob': 0.0},
  )
  tokenizer = load_tokenizer(TOKENIZER)
  conversations = sources.read_values(
    os.path.join(DEMO, 'sft', 'eval.parquet'), 'conversations'
  ).values
  samples = [
    chat.render_sample(c, t, tokenizer, max_len=256)
    for c in conversations
    for t in chat.assistant_turns(c)
  ]
  segments = []
  for batch in take(pipeline.build(cfg, seed=0, split='eval'), 12):
    for inputs, segment_ids, loss in zip(batch['inputs'], batch['segment_ids'], batch['loss_mask']):
      for s in range(1, segment_ids.max() + 1):
        at = segment_ids == s
        segments.append((inputs[at], loss[at]))
  assert len(segments) > 20
  for (tokens, loss), sample in zip(segments, samples):
    np.testing.assert_array_equal(tokens, sample['tokens'])
    # Position i is trained exactly when token i + 1 is an assistant target.
    np.testing.assert_array_equal(loss[:-1], sample['target_mask'][1:])
    assert loss[-1] == 0


def prepare_sft_eval(out, tokenizer=TOKENIZER, max_len=0) -> str:
  path = os.path.join(DEMO, 'sft', 'eval.parquet')
  request = prepare.Request(
    inputs=(path,), tokenizer=tokenizer, format='chat', field='conversations', max_len=max_len
  )
  prepare.prepare(request, str(out), progress=False)
  return str(out)


@pytest.mark.parametrize('packing', ['document', 'best_fit'])
def test_long_prepared_chat_samples_are_cut_on_the_right_like_raw_ones(tmp_path, packing, caplog):
  # Prepared without a cut, trained at a seq_len a third of the samples exceed: each must be cut
  # on the right and keep its prompt, never continued in a later piece without it.
  prepared = prepare_sft_eval(tmp_path / 'p')
  seq_len = 128
  assert prepare.read_manifest(prepared)['max_tokens'] > seq_len
  fields = dict(format='chat', seq_len=seq_len, packing=packing, chat={'system_prompt_prob': 0.0})
  raw = pipeline.build(
    make_cfg(eval_files=os.path.join(DEMO, 'sft', 'eval.parquet'), **fields), seed=0, split='eval'
  )
  with caplog.at_level(logging.WARNING, logger='data_pipeline.documents'):
    batches = pipeline.build(make_cfg(eval_files=prepared, **fields), seed=0, split='eval')
  assert f'cut on the right to data.seq_len={seq_len}' in caplog.text
  im_start = load_tokenizer(TOKENIZER).special_token_id('<|im_start|>')
  full_rows = 0
  for got, expected in zip(take(batches, 12), take(raw, 12)):
    for key in ('inputs', 'targets', 'positions', 'segment_ids', 'loss_mask'):
      np.testing.assert_array_equal(got[key], expected[key])
    for inputs, positions, segment_ids in zip(got['inputs'], got['positions'], got['segment_ids']):
      for s in range(1, segment_ids.max() + 1):
        at = np.flatnonzero(segment_ids == s)
        assert positions[at[0]] == 0 and inputs[at[0]] == im_start  # a sample's start
        full_rows += len(at) == seq_len
  assert full_rows > 3  # the cut samples are there, as whole rows


def test_prepared_data_of_another_tokenizer_is_refused(tmp_path, caplog):
  # The two demo tokenizers have the same vocabulary size and special ids.
  hf = os.path.join(DEMO, 'tokenizer.json')
  prepared = prepare_sft_eval(tmp_path / 'p', tokenizer=hf, max_len=256)
  cfg = make_cfg(eval_files=prepared, format='chat', seq_len=256, packing='document')
  message = (
    f'{prepared} was prepared with tokenizer {hf}, but data.tokenizer is {TOKENIZER}, '
    'another tokenizer (kind'
  )
  with pytest.raises(ValueError, match=re.escape(message)):
    pipeline.build(cfg, seed=0, split='eval')
  bank = make_cfg(**{**cfg, 'mixture': write_bank(tmp_path, {'sft': [1, 1, prepared]})})
  with pytest.raises(ValueError, match=re.escape(message)):
    pipeline.build(bank, seed=0, split='train')
  next(pipeline.build(make_cfg(**{**cfg, 'tokenizer': hf}), seed=0, split='eval'))
  # A manifest written before identities were recorded still loads, with a warning that says
  # how to record it.
  manifest_path = os.path.join(prepared, prepare.MANIFEST)
  with open(manifest_path) as f:
    manifest = json.load(f)
  del manifest['tokenizer_identity'], manifest['max_tokens'], manifest['max_len']
  with open(manifest_path, 'w') as f:
    json.dump(manifest, f)
  with caplog.at_level(logging.WARNING, logger='data_pipeline.documents'):
    next(pipeline.build(cfg, seed=0, split='eval'))
  assert 'records no tokenizer identity' in caplog.text and hf in caplog.text


def test_raw_chat_system_prompt_is_random_but_seeded():
  cfg = make_cfg(
    train_files=os.path.join(DEMO, 'sft', 'eval.parquet'),
    format='chat',
    seq_len=512,
    packing='document',
    chat={'system_prompt_prob': 0.5},
  )
  tokenizer = load_tokenizer(TOKENIZER)
  system = tokenizer.special_token_id('<|im_start|>')

  def starts_with_system(batches):
    flags = []
    for batch in take(batches, 10):
      for inputs, segment_ids in zip(batch['inputs'], batch['segment_ids']):
        for s in range(1, segment_ids.max() + 1):
          text = tokenizer.decode(inputs[segment_ids == s][:3])
          flags.append(text.startswith('<|im_start|>system'))
    return flags

  a = starts_with_system(pipeline.build(cfg, seed=1, split='train'))
  assert a == starts_with_system(pipeline.build(cfg, seed=1, split='train'))
  assert 0.35 < np.mean(a) < 0.9 and system >= 0


def test_unknown_data_format_is_refused():
  cfg = make_cfg(train_files=os.path.join(DEMO, 'eval.jsonl'), format='chatml')
  with pytest.raises(ValueError, match='data.format must be one of text|chat'):
    pipeline.build(cfg, seed=0, split='train')


def test_the_best_fit_window_grows_with_the_row_length():
  from data_pipeline.pipeline import auto_pack_buffer

  assert auto_pack_buffer(512, 132) == 256  # short rows: the floor
  assert auto_pack_buffer(8192, 132) == 1986  # ~32 rows of short documents
  assert auto_pack_buffer(524_288, 100) == 65_536  # capped
  # At 2048 tokens the automatic window pads far less than 256 documents would.
  cfg = make_cfg(train_files=os.path.join(DEMO, 'train.jsonl'), packing='best_fit', seq_len=2048)
  auto = pipeline.build(cfg, seed=0, split='train')
  fixed = pipeline.build(make_cfg(**{**cfg, 'pack_buffer': 256}), seed=0, split='train')
  take(auto, 20)
  take(fixed, 20)
  assert auto.stats.pad_fraction < 0.7 * fixed.stats.pad_fraction  # 1.9% against 3.2%
