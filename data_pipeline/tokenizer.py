"""Tokenizers behind one small interface.

K2-V2 ships an HF `tokenizer.json`; the demo uses a SentencePiece `.model`.
`load_tokenizer(path)` picks the implementation from the file suffix, so the
HF one can be added as a second subclass without touching the callers.

Conventions (K2-V2): bos id 0, eos id 1; `encode` never adds bos/eos, the
pipeline decides where they go. The chat and reasoning-effort tags are single
tokens (see SPECIAL_TOKENS).
"""

import abc
import os

import sentencepiece as spm

BOS_ID = 0
EOS_ID = 1

# ChatML turn markers and the three reasoning-effort tags, each one token.
SPECIAL_TOKENS = (
    '<|im_start|>', '<|im_end|>',
    '<think>', '</think>',
    '<think_fast>', '</think_fast>',
    '<think_faster>', '</think_faster>',
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


def load_tokenizer(path: str) -> Tokenizer:
  """Loads the tokenizer at `path`, choosing the implementation by suffix."""
  if path.endswith('.model'):
    return SentencePieceTokenizer(path)
  if path.endswith('.json'):
    raise NotImplementedError(
        f'HF tokenizer.json files are not supported yet: {path} '
        '(use a SentencePiece .model for now)')
  raise ValueError(f'unsupported tokenizer file {path}: expected a SentencePiece '
                   '.model (HF tokenizer.json support is planned)')
