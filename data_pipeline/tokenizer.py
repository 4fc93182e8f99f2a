"""Tokenizers behind one small interface.

K2-V2 ships an HF `tokenizer.json`; the demo has both a SentencePiece `.model`
and a small byte-level BPE `tokenizer.json`. `load_tokenizer(path)` picks the
implementation: a `.model` file is SentencePiece, a `*.json` file goes through the
`tokenizers` library, and an HF model folder means its `tokenizer.json` or, failing
that, its `tokenizer.model` (what a SentencePiece-based HF folder holds).

`identity()` says which tokenizer gave a sequence of ids: the sha256 of its file and its
vocabulary size and bos / eos / pad ids. data_pipeline.prepare records it in the manifest,
and training refuses prepared data whose identity differs from `data.tokenizer`'s.

Conventions (K2-V2): bos id 0, eos id 1; `encode` never adds bos/eos, the
pipeline decides where they go. The chat and reasoning-effort tags are single
tokens (see SPECIAL_TOKENS).
"""

import abc
import hashlib
import json
import os

import sentencepiece as spm
import tokenizers

BOS_ID = 0
EOS_ID = 1
# pad_id when there is no pad token, as SentencePiece reports it.
NO_PAD_ID = -1

HF_TOKENIZER_FILE = 'tokenizer.json'
HF_CONFIG_FILE = 'tokenizer_config.json'
# What a SentencePiece-based HF model folder holds instead of (or beside) tokenizer.json.
SP_TOKENIZER_FILE = 'tokenizer.model'

# ChatML turn markers and the three reasoning-effort tags, each one token.
SPECIAL_TOKENS = (
  '<|im_start|>',
  '<|im_end|>',
  '<think>',
  '</think>',
  '<think_fast>',
  '</think_fast>',
  '<think_faster>',
  '</think_faster>',
)


class Tokenizer(abc.ABC):
  """What the data pipeline and the sampler need from a tokenizer."""

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Token ids for `text`, without bos/eos."""

  @abc.abstractmethod
  def decode(self, ids) -> str:
    """Text for a sequence of token ids."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int: ...

  @property
  @abc.abstractmethod
  def bos_id(self) -> int: ...

  @property
  @abc.abstractmethod
  def eos_id(self) -> int: ...

  @property
  @abc.abstractmethod
  def pad_id(self) -> int: ...

  @abc.abstractmethod
  def special_token_id(self, token: str) -> int:
    """Id of a token that must be a single piece, e.g. "<|im_end|>"."""

  def identity(self) -> dict | None:
    """What makes ids from this tokenizer mean what they mean: the kind, the sha256 of the
    file, the vocabulary size and the bos / eos / pad ids (an HF tokenizer takes those from
    its tokenizer_config.json). None for a tokenizer without a file."""
    path = getattr(self, 'path', None)
    if path is None:
      return None
    cached = getattr(self, '_identity', None)
    if cached is None:
      cached = self._identity = {
        'kind': type(self).__name__,
        'sha256': file_sha256(path),
        'vocab_size': self.vocab_size,
        'bos_id': self.bos_id,
        'eos_id': self.eos_id,
        'pad_id': self.pad_id,
      }
    return dict(cached)


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def identity_mismatch(recorded: dict, current: dict) -> list[str]:
  """The identity keys on which two tokenizers differ (keys missing from either are skipped)."""
  return [key for key in recorded if key in current and recorded[key] != current[key]]


class SentencePieceTokenizer(Tokenizer):
  """Wraps a SentencePiece `.model` file."""

  def __init__(self, path: str):
    self._path = path
    if not os.path.isfile(path):
      raise FileNotFoundError(f'tokenizer model not found: {path}')
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f'cannot read SentencePiece model {path}: {e}') from e

  @property
  def path(self) -> str:
    return self._path

  def encode(self, text: str) -> list[int]:
    return self._sp.EncodeAsIds(text)

  def decode(self, ids) -> str:
    return self._sp.DecodeIds([int(i) for i in ids])

  @property
  def vocab_size(self) -> int:
    return self._sp.GetPieceSize()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  def special_token_id(self, token: str) -> int:
    token_id = self._sp.PieceToId(token)
    # PieceToId answers unk for unknown pieces instead of failing.
    if self._sp.IdToPiece(token_id) != token:
      raise KeyError(f'{token!r} is not a single token in {self._path}')
    return token_id

  def __reduce__(self):
    # Grain worker processes get the tokenizer by pickling; reload from the file.
    return (SentencePieceTokenizer, (self._path,))


class HFTokenizer(Tokenizer):
  """Wraps an HF `tokenizer.json` (e.g. K2-V2's) through `tokenizers`.

  bos/eos/pad come from the `tokenizer_config.json` next to the file, as HF
  writes it; without one (or for a missing/null entry) they follow K2-V2:
  bos 0, eos 1, no pad.
  """

  def __init__(self, path: str):
    self._path = path
    if not os.path.isfile(path):
      raise FileNotFoundError(f'HF tokenizer file not found: {path}')
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises a bare Exception
      raise ValueError(f'cannot read HF tokenizer {path}: {e}') from e
    self._bos_id, self._eos_id, self._pad_id = self._special_ids()

  def _special_ids(self) -> tuple[int, int, int]:
    config_path = os.path.join(os.path.dirname(self._path), HF_CONFIG_FILE)
    defaults = {'bos_token': BOS_ID, 'eos_token': EOS_ID, 'pad_token': NO_PAD_ID}
    if not os.path.isfile(config_path):
      return tuple(defaults.values())
    try:
      with open(config_path, encoding='utf-8') as f:
        config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f'cannot read tokenizer config {config_path}: {e}') from e
    if not isinstance(config, dict):
      raise ValueError(f'tokenizer config {config_path} is not a JSON object')
    ids = []
    for key, default in defaults.items():
      token = config.get(key)
      # HF writes either the token itself or an AddedToken dict.
      if isinstance(token, dict):
        token = token.get('content')
      if token is None:
        ids.append(default)
        continue
      if not isinstance(token, str):
        raise ValueError(
          f'{key} in {config_path} is neither a string nor a '
          f'dict with a "content" string: {config[key]!r}'
        )
      token_id = self._tok.token_to_id(token)
      if token_id is None:
        raise ValueError(
          f'{key} {token!r} from {config_path} is not in the vocabulary of {self._path}'
        )
      ids.append(token_id)
    return tuple(ids)

  @property
  def path(self) -> str:
    return self._path

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    # Keep special tokens: chat tags are text too, and byte-level BPE then
    # round-trips exactly.
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def bos_id(self) -> int:
    return self._bos_id

  @property
  def eos_id(self) -> int:
    return self._eos_id

  @property
  def pad_id(self) -> int:
    return self._pad_id

  def special_token_id(self, token: str) -> int:
    token_id = self._tok.token_to_id(token)
    # A vocabulary entry can still be split by encode (e.g. a plain BPE piece
    # that the pre-tokenizer cuts); then its id never appears in encoded text.
    if token_id is None or self.encode(token) != [token_id]:
      raise KeyError(f'{token!r} is not a single token in {self._path}')
    return token_id

  def __reduce__(self):
    # Grain worker processes get the tokenizer by pickling; reload from the file.
    return (HFTokenizer, (self._path,))


_ACCEPTED_FORMS = (
  f'a SentencePiece .model file, an HF {HF_TOKENIZER_FILE} (any *.json) file, '
  f'or an HF model folder holding {HF_TOKENIZER_FILE} or {SP_TOKENIZER_FILE}'
)


def tokenizer_file(path: str) -> str:
  """The tokenizer file `path` names: a file as it is; a folder's tokenizer.json, else its
  tokenizer.model. An HF folder may hold both (the fast and the slow tokenizer): the same
  vocabulary, and tokenizer.json is what HF's fast tokenizer, and K2-V2, use.
  FileNotFoundError naming the path when there is none."""
  path = os.fspath(path)
  if os.path.isdir(path):
    for name in (HF_TOKENIZER_FILE, SP_TOKENIZER_FILE):
      if os.path.isfile(os.path.join(path, name)):
        return os.path.join(path, name)
    raise FileNotFoundError(
      f'tokenizer folder {path} holds neither {HF_TOKENIZER_FILE} nor {SP_TOKENIZER_FILE}; '
      f'expected {_ACCEPTED_FORMS}'
    )
  if not os.path.isfile(path):
    raise FileNotFoundError(f'tokenizer {path} does not exist')
  return path


def load_tokenizer(path: str) -> Tokenizer:
  """Loads the tokenizer at `path`, choosing the implementation by its form."""
  if path is None or not str(os.fspath(path)).strip():
    raise ValueError(
      f'no tokenizer is set (data.tokenizer in a config, --tokenizer on a command line): '
      f'give {_ACCEPTED_FORMS}'
    )
  path = os.fspath(path)
  if os.path.isdir(path):
    try:
      path = tokenizer_file(path)
    except FileNotFoundError as error:  # a folder that is there but holds no tokenizer
      raise ValueError(str(error)) from None
  if path.endswith('.model'):
    return SentencePieceTokenizer(path)
  if path.endswith('.json'):
    return HFTokenizer(path)
  missing = '' if os.path.exists(path) else ' (it does not exist)'
  raise ValueError(f'unsupported tokenizer path {path}{missing}: expected {_ACCEPTED_FORMS}')
