"""The tokenizer files of an HF folder, with a chat template that matches training.

Owns `CHAT_TEMPLATE`, data_pipeline/chat.py's rendering (reasoning_effort, tool calls) written
as Jinja; `export_tokenizer`, which writes what AutoTokenizer loads (to-hf); `import_tokenizer`,
which copies an HF folder's tokenizer files beside a converted checkpoint (from-hf). A
folder names its `tokenizer.json` or `tokenizer.model` (data_pipeline.tokenizer.tokenizer_file).
Kept apart from the weights because it changes with the chat format, not
with the model.
"""

import contextlib
import os
import shutil

from data_pipeline.tokenizer import tokenizer_file
from k2jax.hf.schema import read_json, write_json

# Copied beside the tokenizer file by from-hf: the special tokens and the chat template (data, never code).
TOKENIZER_CONFIG_FILES = ('tokenizer_config.json', 'special_tokens_map.json')
# Where from-hf puts the tokenizer in a converted checkpoint (beside params/ and config/).
CHECKPOINT_TOKENIZER_DIR = 'tokenizer'


def import_tokenizer(hf_dir: str, out_dir: str) -> str | None:
  """Copies the tokenizer files of an HF folder into `out_dir` (created); returns the copied
  tokenizer file, or None when the folder has none (nothing is created then)."""
  try:
    source = tokenizer_file(hf_dir)
  except FileNotFoundError:
    return None
  os.makedirs(out_dir)
  for name in (os.path.basename(source), *TOKENIZER_CONFIG_FILES):
    if os.path.isfile(os.path.join(hf_dir, name)):
      shutil.copyfile(os.path.join(hf_dir, name), os.path.join(out_dir, name))
  return os.path.join(out_dir, os.path.basename(source))


# --- the tokenizer and its chat template --------------------------------------------------

# data_pipeline/chat.py's rendering as Jinja: render_prompt with add_generation_prompt, and
# render_text (the final assistant turn as the target: its reasoning, no newline after
# <|im_end|>) without. Tool calls: a list of {name, arguments} or {function: {...}};
# arguments as a dict, or as a JSON string that is inserted verbatim.
CHAT_TEMPLATE = ''.join(
  [
    "{%- set tags = {'high': ['<think>', '</think>'], 'medium': ['<think_fast>', "
    "'</think_fast>'], 'low': ['<think_faster>', '</think_faster>']} -%}",
    "{%- set fields = {'think': 'high', 'think_fast': 'medium', 'think_faster': 'low'} -%}",
    '{%- set effort = reasoning_effort if reasoning_effort is defined and reasoning_effort '
    "is not none else 'high' -%}",
    "{%- if effort not in tags -%}{{ raise_exception('unknown reasoning_effort ' ~ effort ~ "
    "': expected one of high|medium|low') }}{%- endif -%}",
    '{%- if system_prompt is defined and system_prompt is not none and not (messages | '
    "selectattr('role', 'equalto', 'system') | list) -%}",
    "{{- '<|im_start|>system\\n' ~ system_prompt ~ '<|im_end|>\\n' -}}{%- endif -%}",
    '{%- for message in messages -%}',
    "{%- if message.role not in ['system', 'user', 'assistant', 'tool'] -%}{{ raise_exception("
    "'role ' ~ message.role ~ ' is not one of system|user|assistant|tool') }}{%- endif -%}",
    "{%- set target = loop.last and message.role == 'assistant' and not add_generation_prompt -%}",
    "{{- '<|im_start|>' ~ message.role ~ '\\n' -}}",
    '{%- if target -%}{%- for field, level in fields.items() -%}{%- if message[field] is '
    'defined and message[field] is not none -%}',
    '{{- tags[level][0] ~ message[field] ~ tags[level][1] -}}',
    '{%- endif -%}{%- endfor -%}{%- endif -%}',
    '{%- set content = message.content if message.content is defined and message.content is '
    "not none else '' -%}",
    '{{- content -}}',
    '{%- for call in (message.tool_calls if message.tool_calls is defined and '
    'message.tool_calls is not none else []) -%}',
    '{%- set fn = call.function if call.function is defined and call.function is not none '
    'else call -%}',
    '{%- set args = fn.arguments if fn.arguments is defined and fn.arguments is not none '
    'else {} -%}',
    "{%- if content or not loop.first -%}{{- '\\n' -}}{%- endif -%}",
    '{{- \'<tool_call>\\n{"name": \' ~ (fn.name | tojson) ~ \', "arguments": \' ~ (args if '
    "args is string else args | tojson) ~ '}\\n</tool_call>' -}}",
    '{%- endfor -%}',
    "{{- '<|im_end|>' -}}{%- if not target -%}{{- '\\n' -}}{%- endif -%}",
    '{%- endfor -%}',
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' ~ tags[effort][0] -}}"
    '{%- endif -%}',
  ]
)


def export_tokenizer(src: str, out_dir: str, max_length: int, vocab_size: int) -> dict:
  """Writes the tokenizer files AutoTokenizer loads; returns the special ids for config.json.

  An HF tokenizer.json is copied with its tokenizer_config.json; a SentencePiece .model
  becomes tokenizer.model with a LlamaTokenizer config. Both get CHAT_TEMPLATE.
  """
  from data_pipeline import tokenizer as tokenizers

  tok = tokenizers.load_tokenizer(tokenizer_file(src))
  if tok.vocab_size > vocab_size:
    raise ValueError(
      f"--tokenizer={src} has {tok.vocab_size} tokens, more than the model's "
      f'vocab_size={vocab_size}'
    )
  if isinstance(tok, tokenizers.SentencePieceTokenizer):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    sp = spm.SentencePieceProcessor(model_file=tok.path)
    proto = sentencepiece_model_pb2.ModelProto()
    with open(tok.path, 'rb') as f:
      proto.ParseFromString(f.read())
    shutil.copyfile(tok.path, os.path.join(out_dir, 'tokenizer.model'))
    config = {
      'tokenizer_class': 'LlamaTokenizer',
      'bos_token': sp.IdToPiece(tok.bos_id),
      'eos_token': sp.IdToPiece(tok.eos_id),
      'unk_token': sp.IdToPiece(sp.unk_id()),
      # encode() adds no bos/eos in k2jax: keep HF the same.
      'add_bos_token': False,
      'add_eos_token': False,
      'legacy': False,
      'add_prefix_space': proto.normalizer_spec.add_dummy_prefix,
    }
    if tok.pad_id >= 0:
      config['pad_token'] = sp.IdToPiece(tok.pad_id)
  else:
    shutil.copyfile(tok.path, os.path.join(out_dir, tokenizers.HF_TOKENIZER_FILE))
    config_path = os.path.join(os.path.dirname(tok.path), tokenizers.HF_CONFIG_FILE)
    config = (
      read_json(config_path)
      if os.path.isfile(config_path)
      else {'tokenizer_class': 'PreTrainedTokenizerFast'}
    )
    for key, token_id in (('bos_token', tok.bos_id), ('eos_token', tok.eos_id)):
      config.setdefault(key, tok.decode([token_id]))
  config.update(
    chat_template=CHAT_TEMPLATE, model_max_length=max_length, clean_up_tokenization_spaces=False
  )
  write_json(os.path.join(out_dir, tokenizers.HF_CONFIG_FILE), config)
  eos = [tok.eos_id]
  with contextlib.suppress(KeyError):  # chat models stop at <|im_end|> too
    eos.append(tok.special_token_id('<|im_end|>'))
  ids = {'bos_token_id': tok.bos_id, 'eos_token_id': eos if len(eos) > 1 else eos[0]}
  if tok.pad_id >= 0:
    ids['pad_token_id'] = tok.pad_id
  return ids


def checkpoint_tokenizer(step_dir: str, run: dict) -> str | None:
  """The tokenizer a checkpoint names: its run config's `data.tokenizer`, or, when that is
  unset or no longer exists, the tokenizer/ folder from-hf copied beside params/ (a converted
  checkpoint that was moved). A named path that is gone is returned as is, for the caller to
  report; None when nothing is named."""
  named = (run.get('data') or {}).get('tokenizer') or ''
  own = os.path.join(step_dir, CHECKPOINT_TOKENIZER_DIR)
  if named and os.path.exists(named):
    return named
  if os.path.isdir(own):
    return own
  return named or None
