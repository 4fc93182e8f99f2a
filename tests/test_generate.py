"""KV-cache decoding against full recomputation and HF `generate`; sampling; mesh; the CLI."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from k2jax import generate as generate_cli
from k2jax.infer import generation, load
from k2jax.model.transformer import Transformer, init_cache
from k2jax.parallel import sharding
from k2jax.training import train_step
from tests.helpers import (
  DEMO_TOKENIZER,
  TINY,
  hf_llama,
  hf_to_params,
  make_checkpoint,
  random_params,
  require_oracle,
  run_cli,
)

PROMPTS = [
  [5, 17, 3, 99, 42],
  [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17],
  [100, 2, 64, 31, 77, 4, 9, 120],
]
EOS = 1
NEW = 8  # one setting for every library test: the compiled loops are shared


PARAMS = random_params(TINY)


def hf_model(cfg, seed=0):
  return hf_llama(
    cfg, seed, initializer_range=0.1, bos_token_id=0, eos_token_id=EOS, pad_token_id=0
  )


def test_greedy_matches_hf_generate():
  torch = require_oracle('torch')
  model = hf_model(TINY)
  params = hf_to_params(model, TINY)
  # HF: left-padded batch with an attention mask; it derives positions from the mask.
  length = max(map(len, PROMPTS))
  ids = torch.zeros((len(PROMPTS), length), dtype=torch.long)
  mask = torch.zeros_like(ids)
  for i, p in enumerate(PROMPTS):
    ids[i, length - len(p) :] = torch.tensor(p)
    mask[i, length - len(p) :] = 1
  with torch.no_grad():
    out = model.generate(
      ids,
      attention_mask=mask,
      max_new_tokens=NEW,
      do_sample=False,
      eos_token_id=EOS,
      pad_token_id=0,
    )
  expected = []
  for row in out[:, length:].tolist():
    end = row.index(EOS) + 1 if EOS in row else len(row)
    expected.append(row[:end])
  assert any(len(set(row)) > 3 for row in expected)  # not a degenerate repetition
  for padding in ('left', 'right'):
    got = generation.generate(
      params, TINY, PROMPTS, max_new_tokens=NEW, stop_ids=(EOS,), padding=padding
    )
    assert got == expected, padding


def test_kv_cache_logits_equal_full_recomputation():
  """Prefill then one token at a time; rows 0-2 left-padded, rows 3-5 right-padded."""
  params = PARAMS
  apply = jax.jit(Transformer(TINY).apply)
  steps = 5
  prompts = PROMPTS + PROMPTS
  rng = np.random.default_rng(0)
  rows = [list(p) + rng.integers(2, TINY.vocab_size, steps).tolist() for p in prompts]
  length = max(map(len, prompts))
  tokens, segments, positions = (np.zeros((len(rows), length), np.int32) for _ in range(3))
  last = []
  for i, p in enumerate(prompts):
    start = length - len(p) if i < len(PROMPTS) else 0
    tokens[i, start : start + len(p)] = p
    segments[i, start : start + len(p)] = 1
    positions[i, start : start + len(p)] = np.arange(len(p))
    last.append(start + len(p) - 1)
  # The reference: each whole row in one causal pass, right-padded (segment 0 on padding).
  full_length = length + steps
  full = np.zeros((len(rows), full_length), np.int32)
  full_segments = np.zeros_like(full)
  for i, row in enumerate(rows):
    full[i, : len(row)] = row
    full_segments[i, : len(row)] = 1
  reference = np.asarray(apply({'params': params}, full, None, full_segments))

  cache = init_cache(TINY, len(rows), length + steps)
  logits, cache = apply({'params': params}, tokens, positions, segments, cache)
  got = np.asarray(logits)[np.arange(len(rows)), last]
  for step in range(steps + 1):
    for i, p in enumerate(prompts):
      np.testing.assert_allclose(got[i], reference[i, len(p) - 1 + step], atol=2e-5)
    if step < steps:
      feed = np.asarray([[r[len(p) + step]] for r, p in zip(rows, prompts)], np.int32)
      feed_positions = np.asarray([[len(p) + step] for p in prompts], np.int32)
      logits, cache = apply({'params': params}, feed, feed_positions, np.ones_like(feed), cache)
      got = np.asarray(logits)[:, 0]
  assert int(cache['index']) == length + steps


def test_sampling_is_seeded_and_respects_top_p():
  params = PARAMS
  kwargs = dict(max_new_tokens=NEW, stop_ids=(EOS,))
  greedy = generation.generate(params, TINY, PROMPTS, **kwargs)
  first = generation.generate(params, TINY, PROMPTS, temperature=1.0, top_p=0.9, seed=3, **kwargs)
  again = generation.generate(params, TINY, PROMPTS, temperature=1.0, top_p=0.9, seed=3, **kwargs)
  other = generation.generate(params, TINY, PROMPTS, temperature=1.0, top_p=0.9, seed=4, **kwargs)
  assert first == again and first != other and first != greedy
  assert (
    generation.generate(params, TINY, PROMPTS, temperature=1.0, top_p=1e-6, seed=3, **kwargs)
    == greedy
  )

  # Every draw lies in the nucleus: the fewest top tokens whose mass reaches top_p.
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)) * 2, jnp.float32)
  probs = np.asarray(jax.nn.softmax(logits))
  keys = jax.random.split(jax.random.key(0), 200)
  draws = np.asarray(
    jax.jit(jax.vmap(lambda k: generation.sample_logits(logits, k, 1.0, 0.5)))(keys)
  )
  for row in range(4):
    order = np.argsort(-probs[row])
    size = int(np.searchsorted(np.cumsum(probs[row][order]), 0.5) + 1)
    assert set(draws[:, row]) <= set(order[:size].tolist())
    assert len(set(draws[:, row])) > 1 or size == 1


def test_sharded_generation_equals_unsharded():
  """data 2 x tensor 2: heads, MLP and vocab split over tensor, prompts over data."""
  params = PARAMS
  kwargs = dict(max_new_tokens=NEW, stop_ids=(EOS,))
  sampled = dict(temperature=0.7, top_p=0.9, seed=1)
  expected = [
    generation.generate(params, TINY, PROMPTS, **kwargs),
    generation.generate(params, TINY, PROMPTS, **sampled, **kwargs),
  ]
  mesh = sharding.make_mesh(
    ml_collections.ConfigDict(dict(data=2, tensor=2, sequence=1)), jax.devices()[:4]
  )
  boxed = train_step.abstract_params(Transformer(TINY), 1)
  placed = jax.device_put(params, sharding.param_shardings(mesh, boxed, False))
  assert placed['layers']['attention']['q'].sharding.spec[2] == 'tensor'
  got = [
    generation.generate(placed, TINY, PROMPTS, mesh=mesh, **kwargs),
    generation.generate(placed, TINY, PROMPTS, mesh=mesh, **sampled, **kwargs),
  ]
  assert got == expected


# --- the command line, on a checkpoint saved the way training saves one ------------------


CHAIN = (100, 200)  # after the prompt's last token, the crafted model says 100, 200, <|im_end|>


def chain_model(params, last=6, im_end=5):
  """Residual branches off, one-hot embeddings: each listed token predicts the next one."""
  params = jax.tree.map(np.array, params)
  params['layers']['attention']['o'][:] = 0
  params['layers']['mlp']['down'][:] = 0
  params['embedding'][:] = 0
  params['output'][:] = 0
  for dim, (token, following) in enumerate(zip((last, *CHAIN), (*CHAIN, im_end))):
    params['embedding'][token, dim] = 1.0
    params['output'][dim, following] = 1.0
  return params


def test_cli_chat_renders_the_prompt_and_stops_at_im_end(tmp_path, capsys):
  from data_pipeline import chat
  from data_pipeline.tokenizer import load_tokenizer

  tokenizer = load_tokenizer(DEMO_TOKENIZER)
  im_end = tokenizer.special_token_id(chat.IM_END)
  think_fast = tokenizer.special_token_id('<think_fast>')
  make_checkpoint(tmp_path, lambda p: chain_model(p, last=think_fast, im_end=im_end))
  generate_cli.main(
    [
      f'--checkpoint={tmp_path}',
      '--chat',
      '--reasoning_effort=medium',
      '--prompt=Hello there',
      '--prompt=Hi',
      '--max_new_tokens=8',
      '--output=json',
      '--mesh=data:2,tensor:2',
    ]
  )
  out = json.loads(capsys.readouterr().out)
  for text, row in zip(['Hello there', 'Hi'], out):
    assert row['prompt_ids'] == chat.render_prompt(
      [{'role': 'user', 'content': text}], tokenizer, 'medium'
    )
    assert row['ids'] == [*CHAIN, im_end] and row['finish_reason'] == 'stop'
    assert row['text'] == tokenizer.decode(CHAIN)

  # Plain mode does not stop at <|im_end|>; text output prints the completion.
  generate_cli.main(
    [f'--checkpoint={tmp_path}', f'--prompt_ids={think_fast}', '--max_new_tokens=4']
  )
  assert capsys.readouterr().out == tokenizer.decode([*CHAIN, im_end, 0]) + '\n'


def cli_error(capsys, *args) -> str:
  """The stderr of an in-process `python -m k2jax.generate` that must exit with status 2."""
  with pytest.raises(SystemExit) as exit_info:
    generate_cli.main(list(args))
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1, err
  return err


@pytest.mark.parametrize(
  'args,expected',
  [
    ((), 'the following arguments are required: --checkpoint'),
    (('--checkpoint=x', '--prompt=a', '--temperature=hot'), "invalid float value: 'hot'"),
    (('--checkpoint=/nonexistent',), 'give at least one --prompt'),
    (('--checkpoint=x', '--prompt_ids=1,a'), '--prompt_ids=1,a: expected comma-separated'),
    (('--checkpoint=x', '--prompt_ids=1', '--chat'), '--chat renders --prompt text'),
    # Chat options without --chat must not be silently ignored.
    (
      ('--checkpoint=x', '--prompt=a', '--reasoning_effort=low'),
      '--reasoning_effort applies to --chat prompts only: add --chat, or drop --reasoning_effort',
    ),
    (('--checkpoint=x', '--prompt=a', '--system_prompt=Be brief.'), '--system_prompt applies'),
  ],
)
def test_cli_errors_are_one_line(args, expected, capsys):
  assert expected in cli_error(capsys, *args)


def test_cli_error_exit_status_and_stderr_in_a_subprocess():
  result = run_cli('k2jax.generate', '--checkpoint=/nonexistent', '--prompt=x')
  assert result.returncode == 2, result.stderr
  assert result.stderr.startswith('error: checkpoint /nonexistent is neither'), result.stderr
  assert result.stderr.count('\n') == 1, result.stderr


def test_ids_in_ids_out_need_no_tokenizer(tmp_path, capsys):
  """A checkpoint whose run config names no tokenizer (a converted HF folder
  without tokenizer files) generates ids; text options say what needs a tokenizer and how to
  give one; a folder holding only tokenizer.model is a tokenizer."""
  from data_pipeline.tokenizer import load_tokenizer

  make_checkpoint(tmp_path / 'run', tokenizer='')
  run = f'--checkpoint={tmp_path / "run"}'
  generate_cli.main(
    [run, '--prompt_ids=5,17,3', '--prompt_ids=7', '--max_new_tokens=4', '--output=json']
  )
  out = json.loads(capsys.readouterr().out)
  assert [row['prompt_ids'] for row in out] == [[5, 17, 3], [7]]
  assert all(len(row['ids']) in range(1, 5) and row['text'] is None for row in out), out

  err = cli_error(capsys, run, '--prompt_ids=5,17,3', '--max_new_tokens=4')
  assert '--output=text (the default) needs a tokenizer' in err, err
  assert 'names none (data.tokenizer is empty): pass --tokenizer=PATH' in err, err
  assert err.rstrip().endswith('or --output=json for the generated ids alone'), err
  err = cli_error(capsys, run, '--prompt=Hello', '--output=json')
  assert err.startswith('error: --prompt needs a tokenizer'), err
  assert '--chat needs a tokenizer' in cli_error(capsys, run, '--prompt=Hello', '--chat')

  folder = tmp_path / 'sentencepiece'
  folder.mkdir()
  shutil.copyfile(DEMO_TOKENIZER, folder / 'tokenizer.model')
  generate_cli.main(
    [run, f'--tokenizer={folder}', '--prompt=Hello', '--max_new_tokens=4', '--output=json']
  )
  (row,) = json.loads(capsys.readouterr().out)
  assert row['prompt_ids'] == load_tokenizer(DEMO_TOKENIZER).encode('Hello')
  err = cli_error(capsys, run, f'--tokenizer={tmp_path}', '--prompt=Hello')
  assert f'tokenizer folder {tmp_path} holds neither tokenizer.json nor tokenizer.model' in err

  # A named tokenizer that is gone is an error naming the key, not an empty name.
  loaded = load.Loaded(
    params=None,
    model_cfg=TINY,
    run_cfg=ml_collections.ConfigDict({'data': {'tokenizer': str(tmp_path / 'gone.model')}}),
    step_dir=str(tmp_path / 'run'),
    mesh=None,
  )
  with pytest.raises(
    FileNotFoundError,
    match='gone.model does not exist: the run config of .* names it as data.tokenizer; pass --tokenizer=PATH',
  ):
    load.tokenizer_path(loaded)
