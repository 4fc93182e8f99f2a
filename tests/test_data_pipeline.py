"""Tests for data_pipeline: demo corpus, tokenizer, JSONL reading and packing."""

import json
import logging
import os
import re

import ml_collections
import numpy as np
import pytest

from data_pipeline import demo_corpus, jsonl, pipeline, train_tokenizer
from data_pipeline.tokenizer import SPECIAL_TOKENS, load_tokenizer

DEMO_DIR = os.path.join(os.path.dirname(__file__), '..', 'data_pipeline', 'demo')
TOKENIZER_PATH = os.path.join(DEMO_DIR, 'tokenizer.model')
TRAIN_PATH = os.path.join(DEMO_DIR, 'train.jsonl')
EVAL_PATH = os.path.join(DEMO_DIR, 'eval.jsonl')


def make_cfg(**overrides) -> ml_collections.ConfigDict:
  fields = dict(seq_len=32, global_batch_size=4, train_files=TRAIN_PATH,
                eval_files=EVAL_PATH, tokenizer=TOKENIZER_PATH, text_field='text',
                worker_count=0)
  return ml_collections.ConfigDict({**fields, **overrides})


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def stream_tokens(batches) -> list[int]:
  """The token stream the batches were cut from: each row is one seq_len + 1 chunk."""
  stream = []
  for batch in batches:
    for inputs, targets in zip(batch['inputs'], batch['targets']):
      stream += [int(t) for t in inputs] + [int(targets[-1])]
  return stream


def write_jsonl(path, lines):
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return str(path)


@pytest.fixture(scope='module')
def tokenizer():
  return load_tokenizer(TOKENIZER_PATH)


# --- demo corpus -------------------------------------------------------------

def test_generator_reproduces_committed_files(tmp_path):
  demo_corpus.write_corpus(str(tmp_path))
  for name in ('train.jsonl', 'eval.jsonl'):
    with open(tmp_path / name, 'rb') as new, open(os.path.join(DEMO_DIR, name), 'rb') as old:
      assert new.read() == old.read(), f'{name} is stale: rerun data_pipeline.demo_corpus'


def test_corpus_schema_and_size():
  with open(TRAIN_PATH) as f:
    records = [json.loads(line) for line in f]
  assert 2000 <= len(records) <= 4000
  assert all(isinstance(r['text'], str) and isinstance(r['meta']['source'], str)
             for r in records)
  train_bytes, eval_bytes = os.path.getsize(TRAIN_PATH), os.path.getsize(EVAL_PATH)
  assert 1_000_000 <= train_bytes <= 2_500_000
  assert 0.02 < eval_bytes / train_bytes < 0.10


def test_tokenizer_retrains_to_committed_model(tmp_path):
  out = str(tmp_path / 'tokenizer.model')
  train_tokenizer.train(TRAIN_PATH, 2048, out)
  with open(out, 'rb') as new, open(TOKENIZER_PATH, 'rb') as old:
    assert new.read() == old.read(), 'tokenizer.model is stale: rerun train_tokenizer'


# --- tokenizer -----------------------------------------------------------------

def test_tokenizer_ids(tokenizer):
  assert tokenizer.vocab_size == 2048
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 3)


def test_tokenizer_round_trip(tokenizer):
  texts = jsonl.read_texts(EVAL_PATH)[:50] + ['Hi  there\n\n  é 中 ok \t!']
  for text in texts:
    ids = tokenizer.encode(text)
    assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids
    assert tokenizer.decode(ids) == text
  assert tokenizer.decode(np.asarray(tokenizer.encode('abc'), np.int32)) == 'abc'


def test_special_tokens_are_single_tokens(tokenizer):
  for token in SPECIAL_TOKENS:
    token_id = tokenizer.special_token_id(token)
    assert tokenizer.encode(token) == [token_id]
    assert tokenizer.encode(f'x{token}y').count(token_id) == 1
  with pytest.raises(KeyError, match='not a single token'):
    tokenizer.special_token_id('<|no_such_token|>')


def test_tokenizer_file_errors(tmp_path):
  missing = str(tmp_path / 'missing.model')
  with pytest.raises(FileNotFoundError, match=re.escape(missing)):
    load_tokenizer(missing)
  garbage = tmp_path / 'garbage.model'
  garbage.write_bytes(b'not a model')
  with pytest.raises(ValueError, match=re.escape(str(garbage))):
    load_tokenizer(str(garbage))
  with pytest.raises(NotImplementedError, match='tokenizer.json'):
    load_tokenizer(str(tmp_path / 'tokenizer.json'))
  with pytest.raises(ValueError, match='unsupported'):
    load_tokenizer(str(tmp_path / 'vocab.txt'))


# --- pipeline ----------------------------------------------------------------

def test_batch_shapes_and_dtypes():
  batch = next(pipeline.build(make_cfg(), seed=0, split='train'))
  assert set(batch) == {'inputs', 'targets', 'positions', 'segment_ids', 'loss_mask'}
  for key, array in batch.items():
    assert array.shape == (4, 32), key
  assert batch['inputs'].dtype == batch['targets'].dtype == np.int32
  assert batch['positions'].dtype == batch['segment_ids'].dtype == np.int32
  assert batch['loss_mask'].dtype == np.float32
  np.testing.assert_array_equal(batch['positions'], np.tile(np.arange(32), (4, 1)))
  assert (batch['segment_ids'] == 1).all() and (batch['loss_mask'] == 1).all()


def test_eval_stream_is_documents_joined_with_eod(tokenizer):
  batches = take(pipeline.build(make_cfg(), seed=0, split='eval'), 20)
  expected = []
  for text in jsonl.read_texts(EVAL_PATH):
    expected += tokenizer.encode(text) + [tokenizer.eos_id]
  for batch in batches:
    np.testing.assert_array_equal(batch['targets'][:, :-1], batch['inputs'][:, 1:])
  stream = stream_tokens(batches)
  assert stream == expected[:len(stream)]


def test_eval_stream_wraps_around_endlessly(tmp_path, tokenizer):
  path = write_jsonl(tmp_path / 'tiny.jsonl', [json.dumps({'text': 'ab'})])
  batch = next(pipeline.build(make_cfg(eval_files=path), seed=0, split='eval'))
  epoch = tokenizer.encode('ab') + [tokenizer.eos_id]
  assert list(batch['inputs'][0][:2 * len(epoch)]) == epoch * 2


def test_same_seed_same_batches_different_seed_differs():
  first = take(pipeline.build(make_cfg(), seed=7, split='train'), 3)
  again = take(pipeline.build(make_cfg(), seed=7, split='train'), 3)
  other = take(pipeline.build(make_cfg(), seed=8, split='train'), 3)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert not all((a['inputs'] == c['inputs']).all() for a, c in zip(first, other))


def _numbers_seen(cfg, split, process_index, tokenizer, n_batches=6):
  """The document numbers a process reads in its first batches."""
  batches = take(pipeline.build(cfg, seed=0, split=split, process_index=process_index,
                                process_count=2), n_batches)
  assert batches[0]['inputs'].shape == (2, 32)  # global 4 over 2 processes
  text = tokenizer.decode(stream_tokens(batches))
  return set(re.findall(r'doc (\d+) ', text))


@pytest.mark.parametrize('split', ['train', 'eval'])
def test_processes_read_disjoint_documents(tmp_path, tokenizer, split):
  path = write_jsonl(tmp_path / 'docs.jsonl',
                     [json.dumps({'text': f'doc {i} is here.'}) for i in range(20)])
  cfg = make_cfg(train_files=path, eval_files=path)
  seen = [_numbers_seen(cfg, split, index, tokenizer) for index in (0, 1)]
  assert seen[0] and seen[1] and not seen[0] & seen[1]
  assert seen[0] | seen[1] == {str(i) for i in range(20)}


def test_train_epochs_are_reshuffled(tmp_path, tokenizer):
  path = write_jsonl(tmp_path / 'docs.jsonl',
                     [json.dumps({'text': f'doc {i} '}) for i in range(10)])
  batches = take(pipeline.build(make_cfg(train_files=path), seed=0, split='train'), 4)
  text = tokenizer.decode(stream_tokens(batches))
  order = re.findall(r'doc (\d+) ', text)
  first_epoch, second_epoch = order[:10], order[10:20]
  assert sorted(first_epoch, key=int) == [str(i) for i in range(10)]
  assert sorted(second_epoch, key=int) == [str(i) for i in range(10)]
  assert first_epoch != second_epoch


def test_worker_processes_give_the_same_batches():
  in_process = pipeline.build(make_cfg(), seed=3, split='train')
  with_workers = pipeline.build(make_cfg(worker_count=2), seed=3, split='train')
  try:
    for a, b in zip(take(in_process, 3), take(with_workers, 3)):
      np.testing.assert_array_equal(a['inputs'], b['inputs'])
  finally:
    with_workers.close()


# --- bad inputs ----------------------------------------------------------------

@pytest.mark.parametrize('overrides, process_count, message', [
    (dict(seq_len=0), 1, 'seq_len'),
    (dict(seq_len=8.5), 1, 'seq_len'),
    (dict(global_batch_size=-4), 1, 'global_batch_size'),
    (dict(global_batch_size=6), 4, 'not divisible by process_count 4'),
])
def test_bad_config_values(overrides, process_count, message):
  with pytest.raises(ValueError, match=message):
    pipeline.build(make_cfg(**overrides), seed=0, split='train', process_count=process_count)


def test_bad_split_and_process_index():
  with pytest.raises(ValueError, match='split'):
    pipeline.build(make_cfg(), seed=0, split='validation')
  with pytest.raises(ValueError, match='process_index'):
    pipeline.build(make_cfg(), seed=0, split='train', process_index=2, process_count=2)


def test_unknown_packing_mode_is_refused():
  with pytest.raises(NotImplementedError, match='packing'):
    pipeline.build(make_cfg(packing='best_fit'), seed=0, split='train')


def test_glob_matching_nothing_names_the_glob(tmp_path):
  pattern = str(tmp_path / 'nothing-*.jsonl')
  with pytest.raises(FileNotFoundError, match=re.escape(pattern)):
    pipeline.build(make_cfg(train_files=pattern), seed=0, split='train')


def test_bad_lines_are_skipped_with_file_and_line(tmp_path, caplog):
  path = write_jsonl(tmp_path / 'bad.jsonl', [
      json.dumps({'text': 'good one'}),
      '{not json',
      json.dumps({'content': 'no text field'}),
      json.dumps({'text': 42}),
      json.dumps({'text': 'good two'}),
  ])
  with caplog.at_level(logging.WARNING):
    assert jsonl.read_texts(path) == ['good one', 'good two']
  for line_number in (2, 3, 4):
    assert f'{path}:{line_number}:' in caplog.text
  assert 'skipped 3 bad line(s)' in caplog.text
  with pytest.raises(ValueError, match=re.escape(f'{path}:2: malformed JSON')):
    jsonl.read_texts(path, strict=True)


def test_file_without_any_good_line_is_an_error(tmp_path):
  path = write_jsonl(tmp_path / 'bad.jsonl', ['[1, 2]', '{oops'])
  with pytest.raises(ValueError, match='no documents'):
    pipeline.build(make_cfg(train_files=path), seed=0, split='train')
