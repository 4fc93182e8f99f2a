"""One source -> a random-access Grain dataset of token documents.

A document is what packing works on:

  tokens       int32 [n]  token ids
  target_mask  bool [n]   token i is a loss target (predicted from tokens before it)
  source       int32 [n]  the source's index in the run's mixture (for the share metrics)

Three kinds of source, told apart by the path:

  prepared   a directory written by data_pipeline.prepare: ArrayRecord shards, read lazily;
             refused unless prepared with data.tokenizer (its identity is in the manifest),
             and chat samples longer than seq_len are cut on the right, as raw ones are
  raw text   JSONL / parquet files (data_pipeline/sources.py) with a text field
             (`data.text_field`); each document is tokenized on access and ends with EOD
  raw chat   the same files with conversations (`data.format = 'chat'`,
             `data.chat_field`); each assistant turn is one sample (data_pipeline/chat.py),
             cut to seq_len tokens, with an optional random system prompt

Raw sources hold their records in memory: fine for SFT sets and evaluation files; the
pre-training corpora are streamed (`data.stream`, data_pipeline/streaming.py, which makes the
same documents with `make_document`) or go through data_pipeline.prepare first.
"""

import dataclasses
import logging

import grain
import numpy as np

from data_pipeline import chat, prepare, sources
from data_pipeline.tokenizer import Tokenizer, identity_mismatch

logger = logging.getLogger(__name__)

FORMATS = ('text', 'chat')
# Raw sources: documents tokenized to estimate the mean length (for the mixture weights).
_LENGTH_SAMPLE = 512


@dataclasses.dataclass
class OpenedSource:
  documents: grain.MapDataset
  skipped: int = 0  # bad records left out (raw sources)
  exact_mean_tokens: float | None = None  # from a prepared manifest

  def mean_tokens(self) -> float:
    """Tokens per document: exact for prepared data, else estimated from a sample."""
    if self.exact_mean_tokens is not None:
      return self.exact_mean_tokens
    n = len(self.documents)
    picks = np.unique(np.linspace(0, n - 1, min(n, _LENGTH_SAMPLE)).astype(int))
    return float(np.mean([len(self.documents[int(i)]['tokens']) for i in picks]))


class _DecodeRecord(grain.transforms.Map):
  def __init__(self, has_mask: bool, source: int, max_len: int | None = None):
    self._has_mask = has_mask
    self._source = source
    self._max_len = max_len  # chat: right truncation, as _RenderChat does for raw samples

  def map(self, record: bytes) -> dict[str, np.ndarray]:
    tokens, target_mask = prepare.decode_record(record, self._has_mask)
    if self._max_len is not None:
      tokens, target_mask = tokens[: self._max_len], target_mask[: self._max_len]
    return make_document(tokens, target_mask, self._source)


class _TokenizeText(grain.transforms.Map):
  def __init__(self, tokenizer: Tokenizer, source: int):
    self._tokenizer = tokenizer
    self._source = source

  def map(self, text: str) -> dict[str, np.ndarray]:
    tokens = np.asarray(self._tokenizer.encode(text) + [self._tokenizer.eos_id], np.int32)
    return make_document(tokens, np.ones(len(tokens), bool), self._source)


class _RenderChat(grain.transforms.RandomMap):
  """(conversation, target turn) -> the rendered sample; the system prompt is a seeded draw."""

  def __init__(
    self,
    tokenizer: Tokenizer,
    source: int,
    max_len: int,
    system_prompt: str,
    system_prompt_prob: float,
  ):
    self._tokenizer = tokenizer
    self._source = source
    self._max_len = max_len
    self._system_prompt = system_prompt
    self._prob = system_prompt_prob

  def random_map(self, sample, rng: np.random.Generator) -> dict[str, np.ndarray]:
    conversation, turn = sample
    prompt = self._system_prompt if rng.random() < self._prob else None
    rendered = chat.render_sample(
      conversation, turn, self._tokenizer, max_len=self._max_len, system_prompt=prompt
    )
    return make_document(rendered['tokens'], rendered['target_mask'], self._source)


def make_document(tokens, target_mask, source: int) -> dict[str, np.ndarray]:
  return {
    'tokens': tokens,
    'target_mask': target_mask,
    'source': np.full(len(tokens), source, np.int32),
  }


def open_source(
  path: str,
  index: int,
  data_cfg,
  tokenizer: Tokenizer,
  *,
  seed: int,
  system_prompt_prob: float | None = None,
  strict: bool = False,
) -> OpenedSource:
  """The documents of the source at `path`, which is source number `index` of the run."""
  if prepare.is_prepared(path):
    return _open_prepared(path, index, data_cfg, tokenizer)
  data_format = data_cfg.get('format', 'text')
  if data_format not in FORMATS:
    raise ValueError(f'data.format must be one of {"|".join(FORMATS)}, got {data_format!r}')
  if data_format == 'text':
    read = sources.read_values(
      path, data_cfg.get('text_field', 'text'), sources.check_text, strict=strict
    )
    documents = grain.MapDataset.source(read.values).map(_TokenizeText(tokenizer, index))
  else:
    read = sources.read_values(
      path, data_cfg.get('chat_field', 'conversations'), chat.check_conversation, strict=strict
    )
    # One sample per assistant turn, listed up front so the samples are random-access.
    samples = [
      (conversation, turn)
      for conversation in read.values
      for turn in chat.assistant_turns(conversation)
    ]
    chat_cfg = data_cfg.get('chat', {})
    prob = (
      system_prompt_prob
      if system_prompt_prob is not None
      else chat_cfg.get('system_prompt_prob', 0.0)
    )
    render = _RenderChat(
      tokenizer,
      index,
      data_cfg.seq_len,
      chat_cfg.get('system_prompt', chat.DEFAULT_SYSTEM_PROMPT),
      prob,
    )
    # Seeded per source, before any shuffling or sharding: a sample's draw is the same on
    # every host count and every epoch.
    documents = grain.MapDataset.source(samples).random_map(render, seed=seed + 7919 * index)
  return OpenedSource(documents, read.skipped)


def _check_tokenizer(path: str, manifest: dict, tokenizer: Tokenizer) -> None:
  """Refuses prepared data whose ids come from another tokenizer than data.tokenizer."""
  if manifest['vocab_size'] > tokenizer.vocab_size:
    raise ValueError(
      f'{path} was prepared with a {manifest["vocab_size"]}-token tokenizer '
      f'({manifest["tokenizer"]}), larger than data.tokenizer '
      f'({tokenizer.vocab_size} tokens)'
    )
  recorded, current = manifest.get('tokenizer_identity'), tokenizer.identity()
  if recorded is None or current is None:
    if recorded is None:
      logger.warning(
        '%s records no tokenizer identity (prepared before k2jax recorded one), so it cannot '
        'be checked against data.tokenizer; it was prepared with %s. Rerun the same '
        'data_pipeline.prepare command to record it (finished shards are kept)',
        path,
        manifest['tokenizer'],
      )
    return
  differ = identity_mismatch(recorded, current)
  if differ:
    # A 12-digit prefix tells the files apart; the manifest holds the whole hash.
    short = {'sha256': lambda h: h[:12], 'kind': lambda kind: kind.removesuffix('Tokenizer')}
    described = ', '.join(
      f'{k} {short.get(k, str)(recorded[k])} vs {short.get(k, str)(current[k])}' for k in differ
    )
    raise ValueError(
      f'{path} was prepared with tokenizer {manifest["tokenizer"]}, but data.tokenizer is '
      f'{getattr(tokenizer, "path", tokenizer)}, another tokenizer ({described}): its ids would '
      'mean other tokens; set data.tokenizer to the one it was prepared with, or prepare it again'
    )


def _longest(manifest: dict) -> int | None:
  """The longest record's tokens; None if the manifest (an old one) does not say."""
  if 'max_tokens' in manifest:
    return manifest['max_tokens']
  per_shard = [s.get('max_tokens') for s in manifest['shards']]
  return None if None in per_shard else max(per_shard, default=0)


def _open_prepared(path: str, index: int, data_cfg, tokenizer: Tokenizer) -> OpenedSource:
  manifest = prepare.read_manifest(path)
  _check_tokenizer(path, manifest, tokenizer)
  if not manifest['documents']:
    raise ValueError(f'{path}: the prepared data holds no documents')
  records = grain.sources.ArrayRecordDataSource(prepare.shard_files(path))
  mean_tokens = manifest['tokens'] / manifest['documents']
  max_len = None
  if manifest['target_mask']:
    # A chat sample longer than a row would be cut into pieces by packing, and the later ones
    # trained without their prompt: cut it on the right instead, as raw chat samples are.
    longest = _longest(manifest)
    if longest is None or longest > data_cfg.seq_len:
      max_len = data_cfg.seq_len
      mean_tokens = None  # the manifest's mean counts the cut tokens: estimate it instead
    if longest is not None and longest > data_cfg.seq_len:
      logger.warning(
        '%s: chat samples of up to %d tokens are cut on the right to data.seq_len=%d, as raw '
        'chat is (prepare with --max_len=%d to cut them there once)',
        path,
        longest,
        data_cfg.seq_len,
        data_cfg.seq_len,
      )
  documents = grain.MapDataset.source(records).map(
    _DecodeRecord(manifest['target_mask'], index, max_len)
  )
  return OpenedSource(documents, exact_mean_tokens=mean_tokens)
