"""Tests for data_pipeline: demo corpus, SentencePiece tokenizer, packing and the pipeline."""

import collections
import itertools
import json
import os
import re

import grain
import ml_collections
import numpy as np
import pytest

from data_pipeline import demo_corpus, packing, pipeline, sources, train_tokenizer
from data_pipeline.tokenizer import SPECIAL_TOKENS, load_tokenizer

DEMO_DIR = os.path.join(os.path.dirname(__file__), '..', 'data_pipeline', 'demo')
TOKENIZER_PATH = os.path.join(DEMO_DIR, 'tokenizer.model')
TRAIN_PATH = os.path.join(DEMO_DIR, 'train.jsonl')
EVAL_PATH = os.path.join(DEMO_DIR, 'eval.jsonl')


def make_cfg(**overrides) -> ml_collections.ConfigDict:
  fields = dict(
    seq_len=32,
    global_batch_size=4,
    train_files=TRAIN_PATH,
    eval_files=EVAL_PATH,
    tokenizer=TOKENIZER_PATH,
    text_field='text',
    worker_count=0,
    packing='concat',
  )
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


def read_texts(path) -> list[str]:
  return sources.read_values(path, 'text', sources.check_text).values


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
  assert all(isinstance(r['text'], str) and isinstance(r['meta']['source'], str) for r in records)
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
  texts = read_texts(EVAL_PATH)[:50] + ['Hi  there\n\n  é 中 ok \t!']
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
  with pytest.raises(FileNotFoundError, match='tokenizer.json'):
    load_tokenizer(str(tmp_path / 'tokenizer.json'))
  with pytest.raises(ValueError, match='unsupported'):
    load_tokenizer(str(tmp_path / 'vocab.txt'))


# --- pipeline ----------------------------------------------------------------


def test_batch_shapes_and_dtypes():
  batch = next(pipeline.build(make_cfg(), seed=0, split='train'))
  assert set(batch) == {'inputs', 'targets', 'positions', 'segment_ids', 'loss_mask', 'source_ids'}
  for key, array in batch.items():
    assert array.shape == (4, 32), key
  assert batch['inputs'].dtype == batch['targets'].dtype == np.int32
  assert batch['positions'].dtype == batch['segment_ids'].dtype == np.int32
  assert batch['loss_mask'].dtype == np.float32
  np.testing.assert_array_equal(batch['positions'], np.tile(np.arange(32), (4, 1)))
  assert (batch['segment_ids'] == 1).all() and (batch['loss_mask'] == 1).all()
  assert batch['source_ids'].dtype == np.int32 and (batch['source_ids'] == 0).all()


def test_eval_stream_is_documents_joined_with_eod(tokenizer):
  batches = take(pipeline.build(make_cfg(), seed=0, split='eval'), 20)
  expected = []
  for text in read_texts(EVAL_PATH):
    expected += tokenizer.encode(text) + [tokenizer.eos_id]
  for batch in batches:
    np.testing.assert_array_equal(batch['targets'][:, :-1], batch['inputs'][:, 1:])
  stream = stream_tokens(batches)
  assert stream == expected[: len(stream)]


def test_eval_stream_wraps_around_endlessly(tmp_path, tokenizer):
  path = write_jsonl(tmp_path / 'tiny.jsonl', [json.dumps({'text': 'ab'})])
  batch = next(pipeline.build(make_cfg(eval_files=path), seed=0, split='eval'))
  epoch = tokenizer.encode('ab') + [tokenizer.eos_id]
  assert list(batch['inputs'][0][: 2 * len(epoch)]) == epoch * 2


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
  batches = take(
    pipeline.build(cfg, seed=0, split=split, process_index=process_index, process_count=2),
    n_batches,
  )
  assert batches[0]['inputs'].shape == (2, 32)  # global 4 over 2 processes
  if cfg.packing == 'concat':
    text = tokenizer.decode(stream_tokens(batches))
  else:
    text = tokenizer.decode([t for b in batches for t in b['inputs'][b['segment_ids'] > 0]])
  return set(re.findall(r'doc (\d+) ', text))


@pytest.mark.parametrize('packing', ['concat', 'document', 'best_fit'])
@pytest.mark.parametrize('split', ['train', 'eval'])
def test_processes_read_disjoint_documents(tmp_path, tokenizer, split, packing):
  path = write_jsonl(
    tmp_path / 'docs.jsonl', [json.dumps({'text': f'doc {i} is here.'}) for i in range(20)]
  )
  cfg = make_cfg(train_files=path, eval_files=path, packing=packing, pack_buffer=8)
  seen = [_numbers_seen(cfg, split, index, tokenizer) for index in (0, 1)]
  assert seen[0] and seen[1] and not seen[0] & seen[1]
  assert seen[0] | seen[1] == {str(i) for i in range(20)}


def test_train_epochs_are_reshuffled(tmp_path, tokenizer):
  path = write_jsonl(
    tmp_path / 'docs.jsonl', [json.dumps({'text': f'doc {i} '}) for i in range(10)]
  )
  batches = take(pipeline.build(make_cfg(train_files=path), seed=0, split='train'), 4)
  text = tokenizer.decode(stream_tokens(batches))
  order = re.findall(r'doc (\d+) ', text)
  first_epoch, second_epoch = order[:10], order[10:20]
  assert sorted(first_epoch, key=int) == [str(i) for i in range(10)]
  assert sorted(second_epoch, key=int) == [str(i) for i in range(10)]
  assert first_epoch != second_epoch


@pytest.mark.parametrize('packing', ['concat', 'best_fit'])
def test_worker_processes_give_the_same_batches(packing):
  cfg = {'packing': packing, 'pack_buffer': 16}
  in_process = pipeline.build(make_cfg(**cfg), seed=3, split='train')
  with_workers = pipeline.build(make_cfg(**cfg, worker_count=2), seed=3, split='train')
  try:
    for a, b in zip(take(in_process, 3), take(with_workers, 3)):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
  finally:
    with_workers.close()


# --- document and best-fit packing ----------------------------------------------

PACKED = ['document', 'best_fit']


@pytest.fixture(scope='module')
def eval_docs(tokenizer):
  """The eval documents as the pipeline tokenizes them: text ids, then EOD."""
  return [tokenizer.encode(text) + [tokenizer.eos_id] for text in read_texts(EVAL_PATH)]


def doc_pieces(docs, seq_len, repeats=3):
  """(tokens, first position) of every row-sized piece of `docs`, repeated, in stream order."""
  return [
    (tuple(doc[start : start + seq_len]), start)
    for doc in docs * repeats
    for start in range(0, len(doc), seq_len)
  ]


def check_row_layout(batch, pad_id, seq_len):
  """Checks every row's segments, positions, targets and loss mask; returns its pieces.

  Rows hold segments 1, 2, 3, ... then padding; a segment's positions count up from a
  multiple of seq_len (0 unless it continues an over-long document); targets are the next
  input of the same segment; loss_mask is 1 exactly where such a target exists.
  """
  rows = []
  for inputs, targets, positions, segments, loss in zip(
    batch['inputs'], batch['targets'], batch['positions'], batch['segment_ids'], batch['loss_mask']
  ):
    used = int((segments > 0).sum())
    assert (segments[used:] == 0).all(), 'padding only at the end of a row'
    assert segments[0] == 1 and set(np.diff(segments[:used])) <= {0, 1}
    pad = segments == 0
    assert (inputs[pad] == pad_id).all() and (positions[pad] == 0).all()
    same_next = np.append((segments[:-1] == segments[1:]) & ~pad[:-1], False)
    np.testing.assert_array_equal(loss, same_next.astype(np.float32))
    np.testing.assert_array_equal(targets[:-1][same_next[:-1]], inputs[1:][same_next[:-1]])
    assert (targets[~same_next] == pad_id).all()
    pieces = []
    for segment_id in range(1, int(segments.max()) + 1):
      at = np.flatnonzero(segments == segment_id)
      start = int(positions[at[0]])
      assert start % seq_len == 0
      np.testing.assert_array_equal(positions[at], start + np.arange(len(at)))
      pieces.append((tuple(int(t) for t in inputs[at]), start))
    rows.append(pieces)
  return rows


@pytest.mark.parametrize('mode', PACKED)
def test_packed_rows_hold_every_document_token_once(eval_docs, mode):
  seq_len, pack_buffer = 64, 24  # many eval documents are longer than a row
  cfg = make_cfg(seq_len=seq_len, global_batch_size=8, packing=mode, pack_buffer=pack_buffer)
  batches = take(pipeline.build(cfg, seed=0, split='eval'), 60)
  rows = [row for batch in batches for row in check_row_layout(batch, 3, seq_len)]
  expected = doc_pieces(eval_docs, seq_len)
  assert any(start > 0 for _, start in expected)  # over-long documents are exercised
  observed = [piece for row in rows for piece in row]
  if mode == 'document':
    # Stream order: gluing continued pieces back gives the documents, in file order.
    assert observed == expected[: len(observed)]
    docs = []
    for tokens, start in observed:
      if start:
        docs[-1] += tokens
      else:
        docs.append(tokens)
    assert [list(d) for d in docs[:-1]] == (eval_docs * 3)[: len(docs) - 1]
    # Greedy: a row is closed only when the next piece does not fit in it.
    for row, next_row in itertools.pairwise(rows):
      assert sum(len(t) for t, _ in row) + len(next_row[0][0]) > seq_len
  else:
    # Each window of pack_buffer pieces fills whole rows: same pieces, any order.
    windows = [expected[i : i + pack_buffer] for i in range(0, len(expected), pack_buffer)]
    in_window = collections.Counter()
    for row in rows:
      in_window.update(row)
      window = collections.Counter(windows[0])
      assert not in_window - window, 'a row mixes windows or invents a piece'
      if in_window == window:
        windows.pop(0)
        in_window = collections.Counter()
    assert len(windows) < len(expected) // pack_buffer - 5  # several windows checked
  # No segment crosses rows unless its document is longer than a row.
  whole = {tuple(doc) for doc in eval_docs if len(doc) <= seq_len}
  long_pieces = set(doc_pieces([doc for doc in eval_docs if len(doc) > seq_len], seq_len, 1))
  for tokens, start in observed:
    assert (start == 0 and tokens in whole) or (tokens, start) in long_pieces
  assert len(observed) > len(expected) // 3  # more than one pass over the eval documents


def _pack_by_hand(mode, pack_buffer=7):
  """Rows packed from documents of 3, 5, 4, 10, 2 and 6 tokens (repeated) into rows of 8."""
  lengths = [3, 5, 4, 10, 2, 6]
  docs = [
    {
      'tokens': np.arange(100 * d, 100 * d + n, dtype=np.int32),
      'target_mask': np.ones(n, bool),
      'source': np.full(n, d, np.int32),
    }
    for d, n in enumerate(lengths, start=1)
  ]
  stream = grain.MapDataset.source(docs).repeat().to_iter_dataset()
  batches = iter(
    packing.PackedBatchIterDataset(
      stream, mode=mode, seq_len=8, batch_size=5, pad_id=0, pack_buffer=pack_buffer, seed=0
    )
  )
  rows = check_row_layout(next(batches), 0, 8)
  named = {
    (tuple(doc['tokens'][start : start + 8]), start): f'd{d}' + ('+' if start else '')
    for d, doc in enumerate(docs, start=1)
    for start in (0, 8)
  }
  return [[named[piece] for piece in row] for row in rows], batches.stats


def test_document_packing_by_hand():
  rows, stats = _pack_by_hand('document')
  # d4 is longer than a row: its second piece (d4+) starts at position 8 in a new segment.
  assert rows == [['d1', 'd2'], ['d3'], ['d4'], ['d4+', 'd5'], ['d6']]
  assert (stats.rows, stats.tokens, stats.pad_tokens, stats.segments) == (5, 40, 10, 7)


def test_packed_loss_mask_follows_the_targets_mask():
  # A chat-like sample: only the last three tokens are targets (the answer).
  doc = {
    'tokens': np.arange(10, 16, dtype=np.int32),
    'target_mask': np.array([0, 0, 0, 1, 1, 1], bool),
    'source': np.full(6, 2, np.int32),
  }
  stream = grain.MapDataset.source([doc]).repeat().to_iter_dataset()
  batch = next(
    iter(
      packing.PackedBatchIterDataset(
        stream, mode='document', seq_len=8, batch_size=1, pad_id=0, pack_buffer=1, seed=0
      )
    )
  )
  # Position i is trained when its target, token i + 1, is: positions 2, 3, 4.
  np.testing.assert_array_equal(batch['loss_mask'][0], [0, 0, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(batch['source_ids'][0], [2] * 6 + [-1] * 2)


def test_best_fit_packing_by_hand():
  rows, stats = _pack_by_hand('best_fit')
  # The window of 7 pieces, best-fit decreasing: 8 | 6+2 | 5+3 | 4+2, rows then shuffled.
  assert sorted(rows[:4]) == [['d1', 'd2'], ['d3', 'd5'], ['d4'], ['d4+', 'd6']]
  assert rows[4] in rows[:4]  # the next window holds the same 7 pieces
  assert stats.pad_tokens == 2 + (2 if rows[4] == ['d3', 'd5'] else 0)


def test_best_fit_rows_are_best_fit_decreasing():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 101, size=300)
  rows = packing.best_fit_rows(lengths, 100)
  assert sorted(i for row in rows for i in row) == list(range(300))
  for r, row in enumerate(rows):
    assert row == sorted(row) and sum(lengths[row]) <= 100
    later = [lengths[i] for other in rows[r + 1 :] for i in other]
    if later:  # closed only when nothing left fits; opened with the largest left
      assert min(later) > 100 - sum(lengths[row])
      assert max(lengths[row]) >= max(later)
  assert packing.best_fit_rows([5, 3, 5, 2], 8) == [[0, 1], [2, 3]]  # ties: stream order
  with pytest.raises(ValueError, match='1..8'):
    packing.best_fit_rows([9], 8)


def test_best_fit_pads_less_than_document_packing():
  fractions = {}
  for mode in PACKED:
    batches = pipeline.build(make_cfg(seq_len=512, packing=mode), seed=0, split='train')
    take(batches, 100)
    stats = pipeline.packing_stats(batches)
    assert (stats.rows, stats.tokens) == (400, 400 * 512)
    assert stats.loss_tokens == stats.tokens - stats.pad_tokens - stats.segments
    fractions[mode] = stats.pad_fraction
  print(f'pad fraction at seq_len 512: {fractions}')
  assert fractions['best_fit'] < 0.05 and fractions['document'] > 0.1
  assert pipeline.packing_stats(pipeline.build(make_cfg(), seed=0, split='train')) is None


@pytest.mark.parametrize('mode', PACKED)
def test_packed_batches_are_deterministic_and_restorable(mode):
  cfg = make_cfg(seq_len=64, packing=mode, pack_buffer=16)
  first = pipeline.build(cfg, seed=7, split='train')
  take(first, 5)  # the state is taken in the middle of a best-fit window
  state = json.loads(json.dumps(first.get_state()))  # as a checkpoint stores it
  later = take(first, 6)
  again = pipeline.build(cfg, seed=7, split='train')
  take(again, 5)
  restored = pipeline.build(cfg, seed=7, split='train')
  restored.set_state(state)
  other = take(pipeline.build(cfg, seed=8, split='train'), 11)
  for a, b, c in zip(later, take(again, 6), take(restored, 6)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
      np.testing.assert_array_equal(a[key], c[key])
  assert pipeline.packing_stats(restored) == pipeline.packing_stats(first)
  assert not all((a['inputs'] == c['inputs']).all() for a, c in zip(later, other[5:]))


# --- bad inputs ----------------------------------------------------------------


@pytest.mark.parametrize(
  'overrides, process_count, message',
  [
    (dict(seq_len=0), 1, 'seq_len'),
    (dict(seq_len=8.5), 1, 'seq_len'),
    (dict(global_batch_size=-4), 1, 'global_batch_size'),
    (dict(global_batch_size=6), 4, 'not divisible by the input shard count 4'),
    (dict(packing='best_fit', pack_buffer=-1), 1, 'pack_buffer'),
  ],
)
def test_bad_config_values(overrides, process_count, message):
  with pytest.raises(ValueError, match=message):
    pipeline.build(make_cfg(**overrides), seed=0, split='train', process_count=process_count)


def test_bad_split_and_process_index():
  with pytest.raises(ValueError, match='split'):
    pipeline.build(make_cfg(), seed=0, split='validation')
  with pytest.raises(ValueError, match='process_index'):
    pipeline.build(make_cfg(), seed=0, split='train', process_index=2, process_count=2)


def test_unknown_packing_mode_is_refused():
  with pytest.raises(
    ValueError,
    match=r'data.packing must be one of concat\|document\|best_fit, '
    r"got 'bestfit'",
  ):
    pipeline.build(make_cfg(packing='bestfit'), seed=0, split='train')


def test_glob_matching_nothing_names_the_glob(tmp_path):
  pattern = str(tmp_path / 'nothing-*.jsonl')
  with pytest.raises(FileNotFoundError, match=re.escape(pattern)):
    pipeline.build(make_cfg(train_files=pattern), seed=0, split='train')


def test_file_without_any_good_line_is_an_error(tmp_path):
  path = write_jsonl(tmp_path / 'bad.jsonl', ['[1, 2]', '{oops'])
  with pytest.raises(ValueError, match='no usable'):
    pipeline.build(make_cfg(train_files=path), seed=0, split='train')
