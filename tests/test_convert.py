"""k2jax <-> HF conversion, with transformers (fp32, CPU) as the oracle: logits, bit-exact
round trips, the exported tokenizer's chat template against data_pipeline.chat, refusals."""

import json
import os
import shutil

import jax
import ml_collections
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pyarrow.parquet as pq
import pytest
from safetensors import safe_open

from data_pipeline import chat
from data_pipeline.tokenizer import load_tokenizer
from k2jax import convert as convert_cli
from k2jax import run_config
from k2jax.hf import convert, safetensors_io
from k2jax.hf import tokenizer as hf_tokenizer
from k2jax.model import config as model_config
from k2jax.model.transformer import Transformer
from k2jax.parallel import sharding
from k2jax.training import checkpoint, train_step
from k2jax.training import run as training_run
from tests.helpers import REPO, require_oracle, run_cli

torch = require_oracle('torch')
transformers = require_oracle('transformers')

DEMO = os.path.join(REPO, 'data_pipeline', 'demo')
HF_TOKENIZER = os.path.join(DEMO, 'tokenizer.json')
SP_TOKENIZER = os.path.join(DEMO, 'tokenizer.model')
IM_END = 5  # the demo tokenizers' id of <|im_end|>
SEQ_LEN = 64
quiet = lambda message: None  # noqa: E731


def tiny_stage():
  """configs/sft.py:debug with a 2-layer model on a data 4 x tensor 2 FSDP mesh."""
  cfg = run_config.load(os.path.join(REPO, 'configs/sft.py:debug'))
  cfg.model.update(
    num_layers=2,
    vocab_size=2048,
    hidden_size=64,
    ffn_size=160,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_base=1e6,
  )
  cfg.mesh.update(data=4, tensor=2, fsdp='full')
  cfg.data.seq_len = SEQ_LEN
  return cfg


def fp32(cfg: model_config.ModelConfig):
  return model_config.ModelConfig(**{**cfg.__dict__, 'dtype': 'float32', 'remat': 'none'})


def k2jax_logits(cfg, params, tokens):
  return np.asarray(jax.jit(Transformer(fp32(cfg)).apply)({'params': params}, tokens))


def hf_logits(model_dir_or_model, tokens):
  model = model_dir_or_model
  if isinstance(model, str):
    model = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
  with torch.no_grad():
    return model.eval()(torch.tensor(np.asarray(tokens))).logits.numpy()


def safetensors_of(hf_dir):
  """{name: array} of every tensor in an HF folder, and their dtypes."""
  weights, dtypes = {}, set()  # dtypes as safetensors names them: F32, BF16
  for name, path in safetensors_io.hf_weights(hf_dir).items():
    with safe_open(path, 'np') as f:
      weights[name] = f.get_tensor(name)
      dtypes.add(f.get_slice(name).get_dtype())
  return weights, dtypes


def sharding_paths(tree):
  """{'layers/mlp/up': array, ...} of a parameter tree."""
  return {
    sharding.path_name(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A k2jax 'training run': random parameters (norms too) saved as step 7 of a workdir."""
  cfg = tiny_stage()
  plan = train_step.plan(cfg)
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda a: (0.1 * rng.standard_normal(a.shape)).astype(a.dtype), plan.abstract_state.params
  )
  workdir = str(tmp_path_factory.mktemp('run'))
  with ocp.CheckpointManager(checkpoint.directory(workdir)) as manager:
    manager.save(
      7,
      args=ocp.args.Composite(
        params=ocp.args.StandardSave(jax.device_put(params, plan.state_sharding.params)),
        config=ocp.args.JsonSave(json.loads(cfg.to_json_best_effort())),
      ),
    )
    manager.wait_until_finished()
  return workdir, cfg, plan, params


@pytest.fixture(scope='module')
def exported(run, tmp_path_factory):
  """to-hf in float32; small shards, so tensors spread over many files."""
  out = str(tmp_path_factory.mktemp('hf') / 'fp32')
  convert.to_hf(run[0], out, dtype='float32', tokenizer=HF_TOKENIZER, shard_size=200e3, log=quiet)
  return out


def test_to_hf_loads_in_transformers_with_equal_logits(run, exported):
  workdir, _, plan, params = run
  # The checkpoint holds device shards as chunks: to-hf puts each in its place.
  q = (
    ocp.StandardCheckpointer()
    .metadata(os.path.join(checkpoint.directory(workdir), '7', 'params'))
    .item_metadata.tree['layers']['attention']['q']
  )
  assert (q.shape, q.storage.chunk_shape) == ((2, 64, 4, 16), (2, 16, 2, 16))
  tokens = np.random.default_rng(1).integers(0, 2048, (2, 24))
  np.testing.assert_allclose(
    hf_logits(exported, tokens), k2jax_logits(plan.model_cfg, params, tokens), atol=1e-4, rtol=0
  )
  config = json.load(open(os.path.join(exported, 'config.json')))
  assert (config['rope_theta'], config['max_position_embeddings']) == (1e6, SEQ_LEN)
  assert (config['bos_token_id'], config['eos_token_id']) == (0, [1, IM_END])
  assert (config['torch_dtype'], config['tie_word_embeddings']) == ('float32', False)
  index = json.load(open(os.path.join(exported, 'model.safetensors.index.json')))
  assert len(set(index['weight_map'].values())) > 3 and len(index['weight_map']) == 2 * 9 + 3
  assert json.load(open(os.path.join(exported, 'generation_config.json')))['eos_token_id'] == [
    1,
    IM_END,
  ]
  assert not os.path.exists(exported + '.partial')
  assert safetensors_of(exported)[1] == {'F32'}


def test_round_trip_is_bit_exact_and_works_as_init_from(run, exported, tmp_path):
  _, _, plan, params = run
  back = str(tmp_path / 'back')
  convert.from_hf(exported, back, mesh='data:4,tensor:2', log=quiet)
  # The output is an init_from source for the same stage: the real hand-off path.
  cfg = tiny_stage()
  cfg.init_from = back
  prepared = training_run.prepare(cfg, str(tmp_path / 'next_stage'))
  assert prepared['init_from'] == back
  loaded = jax.device_get(checkpoint.load_params(back, plan))
  for path, value in sharding_paths(loaded).items():
    if 'norm' in path:  # (w + 1) - 1 rounds in fp32: within half an ulp of 1
      np.testing.assert_allclose(value, sharding_paths(params)[path], atol=6e-8, rtol=0)
    else:
      np.testing.assert_array_equal(value, sharding_paths(params)[path])
  # from-hf copies the HF folder's tokenizer beside the parameters and names it.
  saved = checkpoint.read_run_config(back)
  assert saved['data']['tokenizer'] == os.path.join(back, 'tokenizer', 'tokenizer.json')
  assert sorted(os.listdir(os.path.join(back, 'tokenizer'))) == [
    'tokenizer.json',
    'tokenizer_config.json',
  ]
  # HF -> k2jax -> HF: every tensor bit-identical; the tokenizer is the recorded one.
  again = str(tmp_path / 'again')
  convert.to_hf(back, again, dtype='float32', log=quiet)
  assert load_tokenizer(again).encode('What is 12 + 30?') == load_tokenizer(HF_TOKENIZER).encode(
    'What is 12 + 30?'
  )
  first, second = safetensors_of(exported)[0], safetensors_of(again)[0]
  assert first.keys() == second.keys()
  for name in first:
    np.testing.assert_array_equal(second[name], first[name], err_msg=name)


def test_to_hf_bfloat16_with_the_runs_sentencepiece_tokenizer(run, exported, tmp_path):
  out = str(tmp_path / 'bf16')
  convert.to_hf(run[0], out, shard_size=convert_cli.parse_size('1MB'), log=quiet)  # bf16 default
  weights, dtypes = safetensors_of(out)
  assert dtypes == {'BF16'}, dtypes
  reference = safetensors_of(exported)[0]
  for name, value in weights.items():
    np.testing.assert_array_equal(value, reference[name].astype(ml_dtypes.bfloat16), name)
  assert json.load(open(os.path.join(out, 'config.json')))['torch_dtype'] == 'bfloat16'
  # No --tokenizer: the run config's data.tokenizer (the demo SentencePiece model).
  assert os.path.isfile(os.path.join(out, 'tokenizer.model'))
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  messages = [{'role': 'user', 'content': 'What is 12 + 30?'}]
  assert hf_tok.apply_chat_template(
    messages, add_generation_prompt=True, return_dict=False
  ) == chat.render_prompt(messages, load_tokenizer(SP_TOKENIZER))


# --- HF -> k2jax --------------------------------------------------------------------------


def random_llama(num_kv_heads=2, rope_theta=5e5, vocab=128, seed=0):
  config = transformers.LlamaConfig(
    vocab_size=vocab,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=num_kv_heads,
    head_dim=16,
    rope_theta=rope_theta,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    max_position_embeddings=256,
  )
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # non-trivial norm weights, so the (1+w) mapping is exercised
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
  return model


@pytest.mark.parametrize('num_kv_heads,rope_theta', [(4, 1e4), (2, 5e5), (1, 1e7)])
def test_from_hf_logits_match_transformers(num_kv_heads, rope_theta, tmp_path):
  model = random_llama(num_kv_heads, rope_theta)
  hf_dir = str(tmp_path / 'hf')
  model.save_pretrained(hf_dir, safe_serialization=True, max_shard_size='100KB')
  assert os.path.isfile(os.path.join(hf_dir, 'model.safetensors.index.json'))
  out = str(tmp_path / 'k2')
  cfg = convert.from_hf(hf_dir, out, mesh='data:8', log=quiet)
  assert (cfg.num_kv_heads, cfg.rope_base) == (num_kv_heads, rope_theta)
  saved = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(os.path.join(out, 'config'))
  assert model_config.from_config(ml_collections.ConfigDict(saved['model'])) == cfg
  assert saved['data']['seq_len'] == 256
  assert saved['data']['tokenizer'] == '' and not os.path.exists(os.path.join(out, 'tokenizer'))
  params = ocp.StandardCheckpointer().restore(os.path.join(out, 'params'))
  assert {a.dtype for a in jax.tree.leaves(params)} == {np.dtype('float32')}
  tokens = np.random.default_rng(0).integers(0, 128, (2, 24))
  np.testing.assert_allclose(
    k2jax_logits(cfg, params, tokens), hf_logits(model, tokens), atol=1e-4, rtol=0
  )


# --- the exported tokenizer ---------------------------------------------------------------


def hf_messages(conversation):
  """A 3efforts conversation the way HF callers write it: no None keys, tool calls as
  lists of dicts with dict arguments."""
  out = []
  for turn in conversation:
    turn = {k: v for k, v in turn.items() if v is not None}
    if isinstance(turn.get('tool_calls'), str):
      turn['tool_calls'] = json.loads(turn['tool_calls'])
      for call in turn['tool_calls']:
        function = call.get('function', call)
        function['arguments'] = (
          json.loads(function['arguments'])
          if isinstance(function['arguments'], str)
          else function['arguments']
        )
    out.append(turn)
  return out


TOOL_CONVERSATION = [
  {'role': 'system', 'content': 'You are a careful assistant.'},
  {'role': 'user', 'content': 'Weather in Lomi?'},
  {
    'role': 'assistant',
    'content': 'Let me check.',
    'think': 'Use the tool.',
    'tool_calls': [
      {'name': 'get_weather', 'arguments': {'city': 'Lomi'}},
      {'type': 'function', 'function': {'name': 'get_time', 'arguments': '{"city": "Lomi"}'}},
    ],
  },
  {'role': 'tool', 'content': '{"temp": 21}'},
  {'role': 'user', 'content': 'Thanks! And tomorrow?'},
]


@pytest.mark.parametrize('source', [HF_TOKENIZER, SP_TOKENIZER], ids=['tokenizer.json', 'spm'])
def test_chat_template_renders_like_data_pipeline_chat(source, tmp_path):
  ids = hf_tokenizer.export_tokenizer(source, str(tmp_path), 4096, 2048)
  assert ids == {'bos_token_id': 0, 'eos_token_id': [1, IM_END], 'pad_token_id': 3}
  hf_tok, tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path)), load_tokenizer(source)
  conversations = [TOOL_CONVERSATION] + [
    r['conversations']
    for r in pq.read_table(
      os.path.join(DEMO, 'sft', 'train.parquet'), columns=['conversations']
    ).to_pylist()[:40]
  ]
  for conversation in conversations:
    prompt = conversation if conversation[-1]['role'] != 'assistant' else conversation[:-1]
    for effort in ('high', 'medium', 'low'):
      want = chat.render_prompt(prompt, tok, effort)
      text = hf_tok.apply_chat_template(
        hf_messages(prompt), add_generation_prompt=True, reasoning_effort=effort, tokenize=False
      )
      assert text == tok.decode(want), (effort, prompt)
      # chat.py encodes each piece alone, HF the whole text. SentencePiece has no
      # pre-tokenizer to cut at piece boundaries, so content followed by a tool call
      # ('check.' + '\n<tool_call>') merges into '.\n' there: same text, other ids.
      if source == HF_TOKENIZER or conversation is not TOOL_CONVERSATION:
        assert hf_tok.encode(text, add_special_tokens=False) == want, (effort, prompt)
    if conversation[-1]['role'] == 'assistant':  # a training sample: the final turn's target
      last = len(conversation) - 1
      assert hf_tok.apply_chat_template(
        hf_messages(conversation), tokenize=False
      ) == chat.render_text(conversation, last)
      assert (
        hf_tok.apply_chat_template(hf_messages(conversation), return_dict=False)
        == chat.render_sample(conversation, last, tok)['tokens'].tolist()
      )
  # Default effort is high; an optional system prompt as in render_prompt.
  no_system = TOOL_CONVERSATION[1:2]
  assert hf_tok.apply_chat_template(
    no_system,
    add_generation_prompt=True,
    return_dict=False,
    system_prompt=chat.DEFAULT_SYSTEM_PROMPT,
  ) == chat.render_prompt(no_system, tok, system_prompt=chat.DEFAULT_SYSTEM_PROMPT)
  with pytest.raises(Exception, match='unknown reasoning_effort extreme'):
    hf_tok.apply_chat_template(no_system, add_generation_prompt=True, reasoning_effort='extreme')


# --- refusals -----------------------------------------------------------------------------


def write_config(hf_dir, **changes):
  os.makedirs(hf_dir, exist_ok=True)
  config = random_llama().config.to_dict()
  config.update(changes)
  with open(os.path.join(hf_dir, 'config.json'), 'w') as f:
    json.dump(config, f)


@pytest.mark.parametrize(
  'changes,message',
  [
    (dict(attention_bias=True), 'attention_bias=True is not supported'),
    (dict(mlp_bias=True), 'mlp_bias=True is not supported'),
    (dict(tie_word_embeddings=True), 'tie_word_embeddings=True is not supported'),
    (dict(rope_scaling={'rope_type': 'llama3', 'factor': 8.0}), 'rope_scaling='),
    (
      dict(rope_parameters={'rope_type': 'yarn', 'rope_theta': 1e4, 'factor': 4.0}),
      'rope_parameters.rope_type=.yarn. is not supported',
    ),
    (dict(hidden_act='gelu'), "hidden_act='gelu' is not supported"),
    (dict(model_type='mistral'), "model_type='mistral' is not supported"),
    (dict(num_key_value_heads=3), 'num_heads=4 is not a multiple of model.num_kv_heads=3'),
  ],
)
def test_unsupported_hf_config_is_refused_naming_the_field(changes, message, tmp_path):
  write_config(str(tmp_path), **changes)
  with pytest.raises(ValueError, match=message):
    convert.from_hf(str(tmp_path), str(tmp_path / 'out'), log=quiet)


def test_refusals_name_the_file(tmp_path):
  hf_dir = str(tmp_path / 'hf')
  write_config(hf_dir)
  with open(os.path.join(hf_dir, 'pytorch_model.bin'), 'wb') as f:
    f.write(b'not unpickled')
  with pytest.raises(ValueError, match='only PyTorch pickle weights .pytorch_model.bin.'):
    convert.from_hf(hf_dir, str(tmp_path / 'out'), log=quiet)
  os.remove(os.path.join(hf_dir, 'config.json'))
  with pytest.raises(FileNotFoundError, match='config.json is missing'):
    convert.from_hf(hf_dir, str(tmp_path / 'out'), log=quiet)
  with open(os.path.join(hf_dir, 'config.json'), 'w') as f:
    f.write('{"model_type": "llama",')
  with pytest.raises(ValueError, match='config.json: not valid JSON'):
    convert.from_hf(hf_dir, str(tmp_path / 'out'), log=quiet)

  model = random_llama()
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  from safetensors.numpy import save_file

  for name, tensors, message in [
    (
      'missing',
      {k: v for k, v in state.items() if 'layers.1.mlp.up' not in k},
      'tensor model.layers.1.mlp.up_proj.weight is missing',
    ),
    (
      'bias',
      {**state, 'model.layers.0.self_attn.q_proj.bias': np.zeros(64, np.float32)},
      'q_proj.bias .model.safetensors. has no place in k2jax',
    ),
    (
      'shape',
      {**state, 'lm_head.weight': np.zeros((64, 64), np.float32)},
      r'lm_head.weight has shape \(64, 64\), expected \(128, 64\)',
    ),
  ]:
    folder = str(tmp_path / name)
    write_config(folder)
    save_file(tensors, os.path.join(folder, 'model.safetensors'), metadata={'format': 'pt'})
    with pytest.raises(ValueError, match=message):
      convert.from_hf(folder, str(tmp_path / 'out'), log=quiet)

  # A tokenizer that does not fit the model fails before the weights are read.
  shutil.copyfile(HF_TOKENIZER, os.path.join(folder, 'tokenizer.json'))
  with pytest.raises(
    ValueError, match="tokenizer.json has 2048 tokens, more than the model's vocab_size=128"
  ):
    convert.from_hf(folder, str(tmp_path / 'out'), log=quiet)

  sharded = str(tmp_path / 'sharded')
  model.save_pretrained(sharded, safe_serialization=True, max_shard_size='100KB')
  os.remove(os.path.join(sharded, 'model-00002-of-00005.safetensors'))
  with pytest.raises(FileNotFoundError, match='model-00002-of-00005.safetensors, listed in'):
    convert.from_hf(sharded, str(tmp_path / 'out'), log=quiet)
  with pytest.raises(FileNotFoundError, match='neither a step directory'):
    convert.to_hf(str(tmp_path), str(tmp_path / 'x'), log=quiet)


def test_from_hf_checks_the_stage_config(tmp_path):
  hf_dir = str(tmp_path / 'hf')
  random_llama().save_pretrained(hf_dir, safe_serialization=True)
  with pytest.raises(
    ValueError, match='model.vocab_size is 128 but --config=.*sft.py:debug has 2048'
  ):
    convert.from_hf(
      hf_dir, str(tmp_path / 'out'), config=os.path.join(REPO, 'configs/sft.py:debug'), log=quiet
    )


def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys):
  write_config(str(tmp_path / 'hf'))
  (tmp_path / 'hf' / 'pytorch_model.bin').write_bytes(b'x')
  # One real command: exit status 2 and a single stderr line, no traceback.
  result = run_cli(
    'k2jax.convert', 'from-hf', f'--hf={tmp_path / "hf"}', f'--out={tmp_path / "out"}'
  )
  assert result.returncode == 2, result.stderr
  assert result.stderr.startswith(f'error: {tmp_path / "hf"} holds only PyTorch pickle weights')
  assert result.stderr.count('\n') == 1, result.stderr
  # The rest in-process.
  for args, message in [
    (['to-hf', '--checkpoint=x'], 'error: the following arguments are required: --out'),
    (['to-hf', '--checkpoint=x', '--out=y', '--shard_size=big'], 'error: --shard_size=big'),
    (
      ['to-hf', f'--checkpoint={tmp_path}', f'--out={tmp_path / "y"}'],
      f'error: --checkpoint={tmp_path} is neither a step directory',
    ),
    (
      ['from-hf', f'--hf={tmp_path / "nope"}', '--out=y'],
      f'error: --hf={tmp_path / "nope"} is not',
    ),
  ]:
    with pytest.raises(SystemExit) as exit_info:
      convert_cli.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(message), (args, err)
    assert err.count('\n') == 1, err
  assert convert_cli.parse_size('5GB') == 5e9 and convert_cli.parse_size('1.5 MiB') == 1.5 * 2**20
  with pytest.raises(ValueError, match='--shard_size=big: expected a positive size'):
    convert_cli.parse_size('big')
