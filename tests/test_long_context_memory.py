"""Memory for long rows: the chunked cross-entropy, the named remat policies, and gradient
accumulation laid out as the parameters. CPU, float32."""

import dataclasses
import logging
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.ad_checkpoint import print_saved_residuals

from k2jax.model import config as model_config
from k2jax.model import transformer
from k2jax.model.transformer import Block, Transformer, cross_entropy_sum
from k2jax.parallel import sharding
from k2jax.training import train_step
from tests.helpers import TINY, random_params

PLAIN = dataclasses.replace(TINY, loss_chunk=0)  # today's whole-logits loss, the reference
PARAMS = random_params(TINY)


BATCH, LENGTH = 4, 16


def make_batch(batch=BATCH, length=LENGTH, seed=0):
  rng = np.random.default_rng(seed)
  mask = (rng.random((batch, length)) > 0.3).astype(np.float32)
  mask[0, -5:] = 0.0  # a masked tail, which crosses the chunks' padding
  return {
    'inputs': rng.integers(0, TINY.vocab_size, (batch, length)).astype(np.int32),
    'targets': rng.integers(0, TINY.vocab_size, (batch, length)).astype(np.int32),
    'positions': np.broadcast_to(np.arange(length), (batch, length)).astype(np.int32),
    'segment_ids': np.ones((batch, length), np.int32),
    'loss_mask': mask,
  }


def loss_and_grads(cfg, batch, accum_steps=1):
  model = Transformer(cfg)
  fn = jax.jit(lambda p, b: train_step.loss_and_grads(model, p, b, accum_steps)[:2])
  return fn(PARAMS, batch)


def assert_same(got, want, rtol=1e-5):
  (loss, grads), (ref_loss, ref_grads) = got, want
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=1e-7),
    grads,
    ref_grads,
  )


REFERENCE = loss_and_grads(PLAIN, make_batch())


# 3: 16 positions in 6 chunks of 3, padded to 18; 8: 2 chunks; 4096: one chunk.
@pytest.mark.parametrize('chunk', [3, 8, 4096])
def test_chunked_loss_equals_whole_logits(chunk):
  got = loss_and_grads(dataclasses.replace(TINY, loss_chunk=chunk), make_batch())
  assert_same(got, REFERENCE)


def test_chunked_loss_never_holds_the_whole_logits():
  """The compiled loss + gradient needs a chunk's logits, not the [B, L, V] ones."""
  B, L, E, V = 2, 2048, 64, 4096
  logits_bytes = B * L * V * 4
  args = (
    jax.ShapeDtypeStruct((B, L, E), jnp.float32),
    jax.ShapeDtypeStruct((E, V), jnp.float32),
    jax.ShapeDtypeStruct((B, L), jnp.int32),
    jax.ShapeDtypeStruct((B, L), jnp.float32),
  )

  def whole(h_BxLxE, w_ExV, t_BxL, m_BxL):
    losses_BxL = optax.softmax_cross_entropy_with_integer_labels(h_BxLxE @ w_ExV, t_BxL)
    return jnp.sum(losses_BxL * m_BxL)

  def temp_bytes(loss):
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes(whole) >= logits_bytes  # the measure sees logits when they are whole
  assert temp_bytes(lambda *a: cross_entropy_sum(*a, 128)) < logits_bytes / 4


def on_mesh(cfg, accum_steps):
  """(loss, gradients) of the batch on 8 devices, data 2 x tensor 2 x sequence 2 with FSDP, and
  the compiled step."""
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, tensor=2, sequence=2)))
  model = Transformer(cfg)
  param_sharding = sharding.param_shardings(mesh, train_step.abstract_params(model, LENGTH), True)
  batch_sharding = sharding.batch_sharding(mesh, (BATCH // accum_steps, LENGTH), True)
  params = jax.device_put(PARAMS, param_sharding)
  batch = jax.device_put(make_batch(), batch_sharding)
  with sharding.activate(mesh, True):
    step = jax.jit(
      lambda p, b: train_step.loss_and_grads(model, p, b, accum_steps)[:2],
      in_shardings=(param_sharding, batch_sharding),
    )
    compiled = step.lower(params, batch).compile()
    return compiled(params, batch), compiled


def test_chunked_loss_reduces_the_head_gradient_once():
  """Each batch / length shard sums its chunks' head gradients locally: the step's collective
  bytes do not grow with the number of chunks (one reduction of d head, not one per chunk)."""
  from k2jax.parallel import collectives

  def sent(chunk):
    _, compiled = on_mesh(dataclasses.replace(TINY, loss_chunk=chunk), 1)
    mesh_shape = dict(data=2, tensor=2, sequence=2)
    return collectives.summarize(compiled.as_text(), mesh_shape)['total_bytes']

  one, four = sent(LENGTH), sent(4)
  head_bytes = TINY.hidden_size * TINY.vocab_size * 4
  assert four - one < head_bytes / 4, (one, four, head_bytes)


def test_chunked_loss_sharded_over_vocab_length_and_fsdp():
  """Tensor parallelism splits the vocab, the length is split over sequence x tensor, and
  FSDP shards the head: the chunked loss still equals the single-device whole-logits one."""
  got, _ = on_mesh(dataclasses.replace(TINY, loss_chunk=4), 1)  # 4 chunks, each split 4 ways
  assert_same(got, REFERENCE, rtol=1e-4)


@pytest.mark.parametrize('policy', model_config.REMAT_POLICIES[1:])
def test_remat_policy_matches_no_remat(policy, caplog):
  transformer._log_no_host_memory.cache_clear()  # logged once per process
  with caplog.at_level(logging.WARNING):
    got = loss_and_grads(dataclasses.replace(PLAIN, remat=policy), make_batch())
  assert_same(got, REFERENCE)
  # On CPU (no host memory apart from device memory) offloading falls back to the device.
  offloaded = policy in transformer.OFFLOADED
  assert offloaded == any('stay on the device' in r.getMessage() for r in caplog.records)


def saved_by(policy, capsys, cfg=TINY):
  """What one block keeps for its backward under a REMAT_POLICY entry, one line each."""
  block = Block(cfg)
  x_BxLxE = jnp.ones((2, 8, TINY.hidden_size))
  positions_BxL = jnp.broadcast_to(jnp.arange(8), (2, 8))
  params = jax.tree.map(lambda p: p[0], PARAMS['layers'])  # layer 0 of the stack

  def loss(params, x_BxLxE):
    return jnp.sum(block.apply({'params': params}, x_BxLxE, positions_BxL, positions_BxL)[0])

  capsys.readouterr()
  print_saved_residuals(
    jax.checkpoint(loss, policy=transformer.REMAT_POLICY[policy]), params, x_BxLxE
  )
  return capsys.readouterr().out.splitlines()


QKV = {'query_proj', 'key_proj', 'value_proj'}


@pytest.mark.parametrize(
  'policy,backend,names',
  [
    ('save_qkv_attn', 'xla', QKV | {'attention_out'}),  # the dense reference has no lse
    ('save_qkv_attn', 'blockwise', QKV | {'attention_out', 'attention_lse'}),
    ('save_attn', 'blockwise', {'attention_out', 'attention_lse'}),
    ('save_attn', 'pallas', {'attention_out', 'attention_lse'}),
  ],
)
def test_policies_save_the_named_activations(policy, backend, names, capsys):
  """The flash backends name their output and log-sum-exp inside their forward rule, so the
  policy keeps them and the backward pass needs no second attention forward."""
  cfg = dataclasses.replace(TINY, attention=backend, attention_block_q=16, attention_block_kv=16)
  saved = saved_by(policy, capsys, cfg)
  assert {m for line in saved for m in re.findall(r"named '(\w+)'", line)} == names


def test_offloading_the_block_input_leaves_no_copy_on_the_device(capsys):
  """The policy itself (what a GPU gets): the block's input lives only in host memory."""
  saved = saved_by('offload_block_input', capsys)
  assert not any('argument x_BxLxE' in line for line in saved), saved
  assert [line for line in saved if '<host>' in line] == [
    line for line in saved if f'[2,8,{TINY.hidden_size}]' in line
  ]


def test_accumulated_gradients_lie_as_the_parameters():
  """FSDP on 8 devices: 2 micro-batches equal the single batch, and the accumulation loop
  carries each device's shard of the gradients, not whole copies."""
  got, compiled = on_mesh(PLAIN, accum_steps=2)
  assert_same(got, REFERENCE, rtol=1e-4)
  hlo = compiled.as_text()
  carries = [line.split(' while(')[0] for line in hlo.splitlines() if ' while(' in line]
  V, E = TINY.vocab_size, TINY.hidden_size  # the embedding: vocab over tensor, embed over 4
  assert any(f'f32[{V // 2},{E // 4}]' in carry for carry in carries)
  assert not any(f'f32[{V},{E}]' in carry for carry in carries)


def debug_stage3(dtype: str) -> ml_collections.ConfigDict:
  from k2jax import run_config

  cfg = run_config.load('configs/midtrain.py:stage3,debug')
  cfg.model.dtype = dtype
  cfg.mesh.data, cfg.mesh.tensor, cfg.mesh.sequence = 1, 2, 4
  cfg.data.global_batch_size = 1
  return cfg


def test_estimate_compiles_bfloat16_as_float16_on_cpu():
  """XLA:CPU upcasts the bf16 stack of layer inputs to f32 (a GPU does not); the planner's
  float16 stand-in has the same sizes without that copy, and the report says so."""
  from k2jax import estimate

  stood_in = estimate.plan(debug_stage3('bfloat16'))
  assert stood_in['compute_dtype'] == 'float16'
  assert stood_in['compute_dtype_stands_in_for'] == 'bfloat16'
  assert 'stands in for bfloat16' in estimate.format_report('stage3,debug', stood_in)
  assert estimate.plan(debug_stage3('float32'))['compute_dtype_stands_in_for'] is None
  # The premise: compiled as bf16, the same step needs more temporaries on XLA:CPU.
  cfg = debug_stage3('bfloat16')
  compiled, _, _ = estimate.compile_train_step(train_step.plan(cfg), cfg)
  assert stood_in['memory_per_device']['temp'] < compiled.memory_analysis().temp_size_in_bytes
