"""Tests for data_pipeline.tokenizer: the SentencePiece and HF demo tokenizers."""

import json
import os
import pickle
import re
import shutil
import sys

import numpy as np
import pytest

from data_pipeline import sources, train_tokenizer
from data_pipeline import tokenizer as tokenizers
from data_pipeline.tokenizer import (
  SPECIAL_TOKENS,
  HFTokenizer,
  SentencePieceTokenizer,
  load_tokenizer,
)

DEMO_DIR = os.path.join(os.path.dirname(__file__), '..', 'data_pipeline', 'demo')
SP_PATH = os.path.join(DEMO_DIR, 'tokenizer.model')
HF_PATH = os.path.join(DEMO_DIR, 'tokenizer.json')
HF_CONFIG_PATH = os.path.join(DEMO_DIR, 'tokenizer_config.json')
TRAIN_PATH = os.path.join(DEMO_DIR, 'train.jsonl')
EVAL_PATH = os.path.join(DEMO_DIR, 'eval.jsonl')

# Texts that stress exact round trips: digits, non-ASCII, runs of whitespace,
# a document start without a leading space, and chat tags next to text.
EXTRA_TEXTS = [
  'naïve — 東京',
  'Hi  there\n\n  é 中 ok \t!',
  '3.14159 + 2718 = 2721.14159',
  '\n leading newline and trailing spaces   ',
  'x<|im_end|>y<think>z</think_faster>',
  '',
]


def sample_texts():
  return (
    sources.read_values(EVAL_PATH, 'text').values[:40]
    + sources.read_values(TRAIN_PATH, 'text').values[::150]
    + EXTRA_TEXTS
  )


@pytest.fixture(scope='module', params=['sentencepiece', 'hf'])
def tokenizer(request):
  path = SP_PATH if request.param == 'sentencepiece' else HF_PATH
  return load_tokenizer(path)


def copy_hf_tokenizer(folder, config=None):
  """The demo tokenizer.json in `folder`, with `config` as its tokenizer_config.json."""
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, 'tokenizer.json')
  shutil.copyfile(HF_PATH, path)
  if config is not None:
    with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
      f.write(config if isinstance(config, str) else json.dumps(config))
  return path


# --- both demo tokenizers ------------------------------------------------------


def test_dispatch_by_suffix():
  assert isinstance(load_tokenizer(SP_PATH), SentencePieceTokenizer)
  assert isinstance(load_tokenizer(HF_PATH), HFTokenizer)


def test_ids(tokenizer):
  assert tokenizer.vocab_size == 2048
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 3)


def test_special_tokens_are_single_tokens(tokenizer):
  for offset, token in enumerate(SPECIAL_TOKENS):
    token_id = tokenizer.special_token_id(token)
    assert token_id == 4 + offset, token
    assert tokenizer.encode(token) == [token_id]
    assert tokenizer.encode(f'x{token}y').count(token_id) == 1
  assert tokenizer.encode('<|im_start|>user\n')[0] == tokenizer.special_token_id('<|im_start|>')
  with pytest.raises(KeyError, match='not a single token'):
    tokenizer.special_token_id('<|no_such_token|>')


def test_round_trip(tokenizer):
  for text in sample_texts():
    ids = tokenizer.encode(text)
    assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text
  assert tokenizer.decode(np.asarray(tokenizer.encode('abc 123'), np.int32)) == 'abc 123'


def test_digits_split(tokenizer):
  ids = tokenizer.encode('12345')
  assert len(ids) == 5
  assert [tokenizer.decode([i]) for i in ids] == list('12345')


def test_pickle_reloads_from_path(tokenizer):
  # Grain workers receive the tokenizer pickled.
  data = pickle.dumps(tokenizer)
  assert len(data) < 1000, 'the pickle should hold the path, not the vocabulary'
  clone = pickle.loads(data)
  assert type(clone) is type(tokenizer) and clone.path == tokenizer.path
  text = 'naïve — 東京 <|im_start|>user\n42'
  assert clone.encode(text) == tokenizer.encode(text)
  assert (clone.bos_id, clone.eos_id, clone.pad_id) == (
    tokenizer.bos_id,
    tokenizer.eos_id,
    tokenizer.pad_id,
  )


# --- HF tokenizer.json ----------------------------------------------------------


def test_hf_model_folder(tmp_path):
  # The demo folder holds both files, as an HF folder may: tokenizer.json wins.
  tokenizer = load_tokenizer(DEMO_DIR)
  assert isinstance(tokenizer, HFTokenizer)
  assert os.path.basename(tokenizer.path) == 'tokenizer.json'
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 3)
  with pytest.raises(ValueError, match=r'neither tokenizer\.json nor tokenizer\.model'):
    load_tokenizer(str(tmp_path))


def test_sentencepiece_model_folder(tmp_path):
  # A SentencePiece-based HF folder holds tokenizer.model and no tokenizer.json.
  shutil.copyfile(SP_PATH, tmp_path / 'tokenizer.model')
  tokenizer = load_tokenizer(str(tmp_path))
  assert isinstance(tokenizer, SentencePieceTokenizer)
  assert tokenizer.path == str(tmp_path / 'tokenizer.model')
  assert tokenizer.encode('What is 12 + 30?') == load_tokenizer(SP_PATH).encode('What is 12 + 30?')


@pytest.mark.parametrize('path', ['', '  ', None])
def test_an_unset_tokenizer_names_the_key_that_sets_it(path):
  with pytest.raises(ValueError, match=r'^no tokenizer is set \(data\.tokenizer'):
    load_tokenizer(path)


def test_identity_tells_the_demo_tokenizers_apart(tmp_path):
  # Same vocabulary size and special ids: only the file tells them apart.
  sp, hf = load_tokenizer(SP_PATH).identity(), load_tokenizer(HF_PATH).identity()
  assert (sp['vocab_size'], sp['bos_id'], sp['eos_id']) == (hf['vocab_size'], 0, 1)
  assert tokenizers.identity_mismatch(sp, hf) == ['kind', 'sha256']
  # A copy elsewhere is the same tokenizer; another tokenizer_config.json is not.
  assert (
    load_tokenizer(copy_hf_tokenizer(str(tmp_path / 'copy'))).identity()['sha256'] == (hf['sha256'])
  )
  config = {'bos_token': '<s>', 'eos_token': '<|im_end|>'}
  other = load_tokenizer(copy_hf_tokenizer(str(tmp_path / 'config'), config)).identity()
  assert tokenizers.identity_mismatch(hf, other) == ['eos_id', 'pad_id']


def test_hf_without_config_uses_k2_defaults(tmp_path):
  tokenizer = load_tokenizer(copy_hf_tokenizer(str(tmp_path)))
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, -1)


def test_hf_config_token_forms(tmp_path):
  # HF writes AddedToken dicts as well as plain strings; null means "none".
  config = {
    'bos_token': {
      '__type': 'AddedToken',
      'content': '<|im_start|>',
      'lstrip': False,
      'normalized': False,
      'rstrip': False,
      'single_word': False,
    },
    'eos_token': '<|im_end|>',
    'pad_token': None,
  }
  tokenizer = load_tokenizer(copy_hf_tokenizer(str(tmp_path), config))
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (4, 5, -1)


def test_hf_config_errors(tmp_path):
  config_path = str(tmp_path / 'tokenizer_config.json')
  path = copy_hf_tokenizer(str(tmp_path), {'eos_token': '<|endoftext|>'})
  with pytest.raises(ValueError, match=rf"'<\|endoftext\|>'.*{re.escape(config_path)}"):
    load_tokenizer(path)
  copy_hf_tokenizer(str(tmp_path), '{"bos_token": ')
  with pytest.raises(ValueError, match=re.escape(config_path)):
    load_tokenizer(path)
  copy_hf_tokenizer(str(tmp_path), {'bos_token': 7})
  with pytest.raises(ValueError, match='bos_token'):
    load_tokenizer(path)


def test_hf_special_token_must_encode_alone():
  tokenizer = load_tokenizer(HF_PATH)
  assert tokenizer.special_token_id('<s>') == 0
  # 'Ġapp' is a vocabulary entry, but encoding that text gives other ids.
  with pytest.raises(KeyError, match=re.escape(HF_PATH)):
    tokenizer.special_token_id('Ġapp')


def test_file_errors(tmp_path):
  missing = str(tmp_path / 'missing' / 'tokenizer.json')
  with pytest.raises(FileNotFoundError, match=re.escape(missing)):
    load_tokenizer(missing)
  for name, content in [('broken.json', '{"model": '), ('empty.json', '{}')]:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(path))):
      load_tokenizer(str(path))
  for path in [str(tmp_path / 'vocab.txt'), str(tmp_path / 'no_such_folder')]:
    with pytest.raises(ValueError, match=r'unsupported.*\.model.*tokenizer\.json.*folder'):
      load_tokenizer(path)


# --- training -------------------------------------------------------------------


def test_hf_retrains_to_committed_tokenizer(tmp_path, monkeypatch):
  # Through the CLI, as the committed files were made. Training is
  # bit-reproducible, so compare bytes; ids too, to say what changed.
  out = str(tmp_path / 'tokenizer.json')
  monkeypatch.setattr(
    sys,
    'argv',
    ['train_tokenizer', '--kind=hf', f'--input={TRAIN_PATH}', '--vocab_size=2048', f'--out={out}'],
  )
  train_tokenizer.main()
  new, old = load_tokenizer(out), load_tokenizer(HF_PATH)
  for text in sample_texts():
    assert new.encode(text) == old.encode(text), 'tokenizer.json is stale: rerun train_tokenizer'
  for name, committed in [('tokenizer.json', HF_PATH), ('tokenizer_config.json', HF_CONFIG_PATH)]:
    with open(tmp_path / name, 'rb') as new_file, open(committed, 'rb') as old_file:
      assert new_file.read() == old_file.read(), f'{name} is stale: rerun train_tokenizer'


def test_hf_training_wants_a_json_out(tmp_path):
  with pytest.raises(ValueError, match=r'\.json'):
    train_tokenizer.train_hf(TRAIN_PATH, 2048, str(tmp_path / 'tokenizer.model'))
