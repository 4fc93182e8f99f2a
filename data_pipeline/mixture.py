"""Which sources a run reads, and in what proportions.

A run reads either one path (`data.train_files`) or a mixture (`data.mixture`, a JSON file).
The mixture file is K2-V2's "data bank": one entry per source,

    {"cc_keep_1-1": [190.5e9, 2, "common-crawl/keep/1-1"],       tokens, epochs, path
     "wiki":        {"tokens": 9.1e9, "epochs": 4, "path": "wikipedia"},
     "identity":    {"tokens": "manifest", "epochs": 4, "path": "prepared/identity",
                     "system_prompt_prob": 0.5}}

A source's share of the training tokens is tokens x epochs / sum over sources, or its
explicit `weight` / sum of weights (the two forms cannot be mixed in one file).
`"tokens": "manifest"` takes the count from a prepared directory's manifest. Paths are
globs / folders of raw files or prepared directories (data_pipeline/prepare.py); relative
ones are taken from `data.data_root`, or from the mixture file's folder when that is empty.

The pipeline mixes whole documents. To get token shares from a document mix, each source's
document weight is its token share divided by its mean document length (see
`document_weights`), measured exactly from a prepared manifest or estimated from a sample
of raw documents. The realised token shares are counted in every batch and reported in the
training metrics (`data_share/<name>`).
"""

import dataclasses
import json
import math
import os

from data_pipeline import prepare


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  path: str
  share: float  # requested fraction of the training tokens; the shares sum to 1
  system_prompt_prob: float | None = None  # chat sources: overrides data.chat.system_prompt_prob


def _number(value, where: str, key: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ValueError(f'{where}: {key} must be a number, got {value!r}')
  if value <= 0:
    raise ValueError(f'{where}: {key} must be > 0, got {value!r}')
  return float(value)


def _entry(name: str, value, where: str) -> tuple[str, float, str, float | None]:
  """(kind, weight, path, system_prompt_prob) of one data-bank entry."""
  where = f'{where}: source {name!r}'
  if isinstance(value, list):
    if len(value) != 3:
      raise ValueError(f'{where}: expected [tokens, epochs, path], got {value!r}')
    value = dict(zip(('tokens', 'epochs', 'path'), value))
  if not isinstance(value, dict):
    raise ValueError(f'{where}: expected [tokens, epochs, path] or an object, got {value!r}')
  known = {'tokens', 'epochs', 'path', 'weight', 'system_prompt_prob'}
  unknown = sorted(set(value) - known)
  if unknown:
    raise ValueError(
      f'{where}: unknown key(s) {", ".join(unknown)}; known: {", ".join(sorted(known))}'
    )
  path = value.get('path')
  if not isinstance(path, str) or not path:
    raise ValueError(f'{where}: path must be a non-empty string, got {path!r}')
  if 'weight' in value:
    if 'tokens' in value or 'epochs' in value:
      raise ValueError(f'{where}: give either weight or tokens and epochs, not both')
    kind, weight = 'weight', _number(value['weight'], where, 'weight')
  elif 'tokens' in value:
    kind, epochs = 'tokens', _number(value.get('epochs', 1), where, 'epochs')
    # "manifest": the token count of the prepared directory at `path`, read once resolved.
    weight = (
      ('manifest', epochs)
      if value['tokens'] == 'manifest'
      else _number(value['tokens'], where, 'tokens') * epochs
    )
  else:
    raise ValueError(f'{where}: needs tokens (and epochs) or a weight')
  prob = value.get('system_prompt_prob')
  if prob is not None and (
    isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0 <= prob <= 1
  ):
    raise ValueError(f'{where}: system_prompt_prob must be in [0, 1], got {prob!r}')
  return kind, weight, path, prob


def load_data_bank(path: str, data_root: str = '') -> list[Source]:
  """The sources of a data-bank JSON file, with normalised shares and resolved paths."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'data.mixture: no such file {path}')
  with open(path) as f:
    try:
      bank = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not valid JSON ({e})') from None
  if not isinstance(bank, dict) or not bank:
    raise ValueError(f'{path}: expected a non-empty object {{name: [tokens, epochs, path]}}')
  entries = {name: _entry(name, value, path) for name, value in bank.items()}
  kinds = {kind for kind, *_ in entries.values()}
  if len(kinds) > 1:
    raise ValueError(f'{path}: mixes explicit weights with tokens x epochs; use one form')
  root = data_root or os.path.dirname(os.path.abspath(path))
  resolved = {}
  for name, (_, weight, source_path, prob) in entries.items():
    source_path = _resolve(source_path, root)
    if isinstance(weight, tuple):
      manifest = prepare.read_manifest(source_path)  # names the directory if unprepared
      weight = manifest['tokens'] * weight[1]
      if not weight:
        raise ValueError(f'{path}: source {name!r}: {source_path} holds no tokens')
    resolved[name] = (weight, source_path, prob)
  total = sum(weight for weight, _, _ in resolved.values())
  return [
    Source(name, source_path, weight / total, prob)
    for name, (weight, source_path, prob) in resolved.items()
  ]


def _resolve(path: str, root: str) -> str:
  if '://' in path or os.path.isabs(path):
    return path
  return ','.join(os.path.join(root, p.strip()) for p in path.split(','))


def sources_for(data_cfg, split: str) -> list[Source]:
  """The sources of `split`: the mixture (train only) or the single path of the split."""
  mixture = data_cfg.get('mixture', '')
  if split == 'train' and mixture:
    return load_data_bank(mixture, data_cfg.get('data_root', ''))
  key = 'train_files' if split == 'train' else 'eval_files'
  path = data_cfg.get(key, '')
  if not path:
    raise ValueError(
      f'data.{key} is empty' + (' (and data.mixture too)' if split == 'train' else '')
    )
  return [Source(os.path.basename(path.rstrip('/')) or key, path, 1.0)]


def document_weights(shares, mean_tokens) -> list[float]:
  """Per-source document-sampling weights that give the requested token shares.

  Drawing documents with probability proportional to share / mean length makes the expected
  tokens from a source proportional to its share.
  """
  weights = [share / max(mean, 1e-9) for share, mean in zip(shares, mean_tokens)]
  total = sum(weights)
  return [w / total for w in weights]
