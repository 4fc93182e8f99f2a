"""`model.attention`: what `auto` picks per platform, refusals before compiling, the cuDNN
argument mapping and GQA offset patch (cuDNN itself needs a GPU), and per-device kernels."""

import dataclasses
import os
import types

import jax
import jax._src.cudnn.fused_attention_stablehlo as fused_attention
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax import run_config
from k2jax.model import config as model_config
from k2jax.model.kernels import cudnn
from k2jax.model.kernels import select as sel
from k2jax.model.kernels.reference import dense_attention
from k2jax.parallel import context, sharding
from k2jax.training import train_step
from tests.helpers import REPO

H200 = sel.Platform('gpu', 9.0, 141e9)
A100 = sel.Platform('gpu', 8.0, 80e9)
CPU = sel.Platform('cpu')


def pick(platform, length=8192, **kw):
  return sel.choose('auto', platform, q_length=length, kv_length=length, **kw)


def test_auto_picks_per_platform_as_documented():
  assert pick(H200, documents=False).name == 'cudnn'
  # Packed documents, fp32, an older GPU or a query chunk against other keys: our kernel.
  assert pick(H200, documents=True).name == 'pallas'
  assert pick(H200, documents=False, compute_dtype='float32').name == 'pallas'
  assert pick(A100, documents=False).name == 'pallas'
  assert pick(H200, documents=False, self_attention=False).name == 'pallas'
  assert pick(CPU, length=sel.BLOCKWISE_MIN_LENGTH).name == 'blockwise'
  assert pick(CPU, length=sel.BLOCKWISE_MIN_LENGTH // 2).name == 'xla'
  assert pick(sel.Platform('tpu'), length=512).name == 'xla'
  assert 'sm80' in pick(A100, documents=False).reason
  assert pick(A100, head_dim=96).name == 'blockwise'  # no power-of-two Triton tile


def test_named_backends_are_kept_or_refused_with_the_fallback():
  assert sel.choose('blockwise', CPU, q_length=128, kv_length=128).name == 'blockwise'
  assert 'interpret' in sel.choose('pallas', CPU, q_length=128, kv_length=128).reason
  packed = sel.choose('cudnn', H200, q_length=8192, kv_length=8192, documents=True)
  assert packed.name == 'cudnn' and 'not verified' in packed.reason
  with pytest.raises(ValueError, match=r'cudnn: .*NVIDIA GPU.*use model.attention=blockwise'):
    sel.choose('cudnn', CPU, q_length=128, kv_length=128)
  with pytest.raises(ValueError, match=r'sm80.*use model.attention=pallas'):
    sel.choose('cudnn', A100, q_length=128, kv_length=128)
  with pytest.raises(ValueError, match=r'not on tpu; use model.attention=blockwise'):
    sel.choose('pallas', sel.Platform('tpu'), q_length=128, kv_length=128)
  with pytest.raises(
    ValueError, match=r'power of two >= 16, got 96; use model.attention=blockwise'
  ):
    sel.choose('pallas', A100, q_length=128, kv_length=128, head_dim=96)
  with pytest.raises(ValueError, match=r"model.attention='flash' is not a backend"):
    sel.choose('flash', CPU, q_length=128, kv_length=128)


def test_dense_attention_at_64k_on_a_gpu_is_refused_naming_bytes_and_backend():
  # K2-V2 stage 2 per device: 1 row, 64 heads / tensor 8.
  fits = sel.choose('xla', H200, q_length=8192, kv_length=8192)
  sel.check_fits(fits, H200, batch=1, heads=8, length=8192)
  with pytest.raises(
    ValueError, match=r'xla at 65536 tokens needs 256.0 GiB .* use model.attention=auto'
  ):
    sel.check_fits(fits, H200, batch=1, heads=8, length=65536)
  sel.check_fits(fits, CPU, batch=1, heads=8, length=65536)  # the planner compiles it on CPU


def test_the_plan_resolves_auto_and_refuses_before_compiling(monkeypatch):
  cfg = run_config.load(os.path.join(REPO, 'configs/midtrain.py:stage2,debug'))
  mesh = sharding.make_mesh(cfg.mesh)
  model_cfg = model_config.from_config(cfg.model)
  resolved, choice = train_step.choose_attention(cfg, model_cfg, mesh, 8)
  assert (choice.name, resolved.attention, resolved.documents) == ('blockwise', 'blockwise', True)
  monkeypatch.setattr(sel.Platform, 'of', classmethod(lambda cls, device: H200))
  model_cfg = dataclasses.replace(model_cfg, dtype='bfloat16')
  resolved, choice = train_step.choose_attention(cfg, model_cfg, mesh, 8)
  assert choice.name == 'pallas' and 'documents' in choice.reason  # best_fit packing
  cfg.data.packing = 'concat'
  assert train_step.choose_attention(cfg, model_cfg, mesh, 8)[1].name == 'cudnn'
  cfg.data.seq_len, model_cfg = 65536, dataclasses.replace(model_cfg, attention='xla')
  with pytest.raises(ValueError, match='model.attention=xla at 65536 tokens'):
    train_step.choose_attention(cfg, model_cfg, mesh, 8)


@pytest.mark.parametrize('backend', ['auto', 'xla', 'blockwise', 'pallas', 'cudnn'])
@pytest.mark.parametrize(
  'spec', ['configs/pretrain.py', 'configs/sft.py', 'configs/midtrain.py:stage4']
)
def test_every_stage_config_accepts_every_backend(spec, backend):
  cfg = run_config.load(os.path.join(REPO, spec))
  assert cfg.model.attention == 'auto'
  cfg.model.attention = backend
  run_config.validate(cfg)
  assert model_config.from_config(cfg.model).attention == backend


def test_cudnn_arguments_causal_and_packed():
  q = jnp.zeros((2, 6, 4, 8), jnp.bfloat16)
  k = jnp.zeros((2, 6, 2, 8), jnp.bfloat16)
  segments = jnp.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
  causal = cudnn.cudnn_arguments(q, k, segments, segments, documents=False)
  assert causal['mask_type'] == fused_attention.MaskType.CAUSAL
  assert causal['scale'] == 8**-0.5 and 'q_offsets' not in causal
  packed = cudnn.cudnn_arguments(q, k, segments, segments, documents=True)
  assert packed['mask_type'] == fused_attention.MaskType.PADDING_CAUSAL
  np.testing.assert_array_equal(
    packed['q_seqlen'], [[2, 3, 1, -1, -1, -1], [6, -1, -1, -1, -1, -1]]
  )
  np.testing.assert_array_equal(
    packed['kv_offsets'], [[0, 2, 5, -1, -1, -1, -1], [0, -1, -1, -1, -1, -1, -1]]
  )
  with pytest.raises(ValueError, match='self-attention only.*pallas'):
    cudnn.cudnn_arguments(q[:, :3], k, segments[:, :3], segments, documents=True)


def test_gqa_offset_patch_applies_once_and_only_to_the_buggy_function():
  module = types.SimpleNamespace(_fix_seqlen_offsets=fused_attention._fix_seqlen_offsets)
  assert jax.jit(lambda: jnp.int32(cudnn.has_gqa_offset_bug(module)))() == 1  # while tracing too
  assert cudnn.has_gqa_offset_bug(module)  # JAX 0.10.2 as pinned
  assert cudnn.fix_gqa_offsets(module) and not cudnn.fix_gqa_offsets(module)
  query = jax.ShapeDtypeStruct((2, 4, 8, 16), jnp.bfloat16)
  key = jax.ShapeDtypeStruct((2, 4, 2, 16), jnp.bfloat16)
  seqlen = jnp.array([[2, 2], [4, -1]], jnp.int32)
  offsets = jnp.array([[0, 2, -1], [0, -1, -1]], jnp.int32)
  q_len, kv_len, q_off, kv_off = module._fix_seqlen_offsets(
    seqlen, seqlen, offsets, offsets, query, key
  )
  # Segments start at tokens 0, 2 (row 0) and 4 (row 1); strides: 8 x 16 and 2 x 16.
  np.testing.assert_array_equal(q_off[0, :3], [0, 2 * 128, 4 * 128])
  np.testing.assert_array_equal(kv_off[0, :3], [0, 2 * 32, 4 * 32])
  np.testing.assert_array_equal(q_len, kv_len)
  assert fused_attention._fix_seqlen_offsets is not module._fix_seqlen_offsets  # real one intact


def test_per_device_kernel_equals_the_whole_computation():
  """A kernel mapped over a data 2 x tensor 4 mesh: each device its rows and heads."""
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, 16, 8, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 16, 4, 8)), jnp.float32) for _ in range(2))
  positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
  segments = jnp.asarray(np.repeat([[1, 2]], 8, axis=1).repeat(2, axis=0))
  args = (q, k, v, positions, positions, segments, segments)
  mesh = sharding.make_mesh(dict(data=2, tensor=4, sequence=1))
  with sharding.activate(mesh, False):
    mapped = jax.jit(context.shard_attention(dense_attention, custom_call=True))
    assert 'shard_map' in str(mapped.trace(*args).jaxpr)
    out = mapped(*args)
  np.testing.assert_allclose(out, dense_attention(*args), rtol=1e-6, atol=1e-6)
