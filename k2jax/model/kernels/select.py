"""`model.attention` -> a backend for this platform and these lengths, with the reason.

`auto` (every stage config's default):
  - NVIDIA GPU of compute capability >= 9.0 (H100/H200), bf16/fp16 compute, self-attention
    (queries are the keys' own tokens) and rows without packed documents: `cudnn`;
  - any other NVIDIA GPU case: `pallas` (our kernel: documents, query/key offsets, fp32),
    or `blockwise` for a head dim the kernel cannot tile;
  - CPU: `blockwise` from BLOCKWISE_MIN_LENGTH keys on (measured by benchmarks/attention.py),
    `xla` below, where the dense scores are small and one fused einsum is faster.
A named backend is taken as asked, or refused with the reason and the backend to use instead.
"""

import dataclasses
import functools

import jax

from k2jax.model.config import ATTENTION_CHOICES
from k2jax.parallel import context

CHOICES = ATTENTION_CHOICES  # 'auto' and the backends' names
NAMES = tuple(name for name in CHOICES if name != 'auto')

# From this many keys on, `auto` picks `blockwise` on CPU: benchmarks/attention.py measured it
# 1.3x faster than `xla` at 512 keys, about even at 256 (docs/attention.md).
BLOCKWISE_MIN_LENGTH = 512
# The dense reference is refused on a GPU when its scores would take more than this share of
# device memory: the rest holds weights, optimizer state and the other activations.
XLA_MAX_MEMORY_SHARE = 0.25
DEFAULT_GPU_MEMORY = 141e9  # H200, when the device does not report its limit


@dataclasses.dataclass(frozen=True)
class Platform:
  """What the choice depends on: 'cpu' | 'gpu' | 'tpu', and the GPU's compute capability."""

  kind: str
  compute_capability: float = 0.0
  memory_bytes: float = 0.0

  @classmethod
  def current(cls) -> 'Platform':
    return cls.of(jax.devices()[0])

  @classmethod
  def of(cls, device) -> 'Platform':
    if device.platform in ('gpu', 'cuda', 'rocm'):
      capability = float(getattr(device, 'compute_capability', 0) or 0)
      try:
        memory = float(device.memory_stats().get('bytes_limit', 0))
      except Exception:  # noqa: BLE001 - some runtimes do not report memory
        memory = 0.0
      kind = 'gpu' if device.platform != 'rocm' else 'rocm'
      return cls(kind, capability, memory or DEFAULT_GPU_MEMORY)
    return cls(device.platform)


@dataclasses.dataclass(frozen=True)
class Choice:
  name: str
  reason: str


def choose(
  requested: str,
  platform: Platform,
  *,
  q_length: int,
  kv_length: int,
  compute_dtype: str = 'bfloat16',
  head_dim: int = 128,
  documents: bool = True,
  self_attention: bool = True,
) -> Choice:
  """The backend `requested` resolves to, or ValueError naming what to use instead.

  documents: rows may hold several documents (segment ids differ within a row).
  self_attention: queries and keys are the same tokens at the same positions (no context
  parallelism), which cuDNN's index-based causal mask needs.
  """
  if requested not in CHOICES:
    raise ValueError(
      f'model.attention={requested!r} is not a backend; choose one of {"|".join(CHOICES)}'
    )
  cudnn_blocker = _cudnn_blocker(platform, compute_dtype, head_dim, documents, self_attention)
  # Triton tiles are powers of two of at least 16 (kernels/pallas_gpu.py).
  pallas_blocker = (
    None
    if head_dim >= 16 and not head_dim & (head_dim - 1)
    else f'the Pallas kernel needs a head dim that is a power of two >= 16, got {head_dim}'
  )
  if requested == 'auto':
    if platform.kind == 'gpu':
      if cudnn_blocker is None and documents:
        cudnn_blocker = 'rows pack documents and its packed layout is not verified on a GPU yet'
      if cudnn_blocker is None:
        return Choice('cudnn', f'NVIDIA sm{_sm(platform)}: cuDNN fused flash attention')
      if pallas_blocker is not None:
        return Choice('blockwise', f'NVIDIA GPU, {cudnn_blocker}, and {pallas_blocker}')
      return Choice('pallas', f'NVIDIA GPU, cuDNN not usable ({cudnn_blocker}): our Pallas kernel')
    if platform.kind == 'cpu' and kv_length >= BLOCKWISE_MIN_LENGTH:
      return Choice(
        'blockwise', f'CPU, {kv_length} keys >= {BLOCKWISE_MIN_LENGTH}: linear-memory blockwise'
      )
    return Choice('xla', f'{platform.kind.upper()}, {kv_length} keys: dense einsum attention')
  if requested == 'cudnn' and cudnn_blocker is not None:
    fallback = 'pallas' if platform.kind == 'gpu' else 'blockwise or xla'
    raise ValueError(f'model.attention=cudnn: {cudnn_blocker}; use model.attention={fallback}')
  if requested == 'pallas' and pallas_blocker is not None:
    raise ValueError(f'model.attention=pallas: {pallas_blocker}; use model.attention=blockwise')
  if requested == 'pallas' and platform.kind not in ('gpu', 'cpu'):
    raise ValueError(
      f'model.attention=pallas: the kernel targets NVIDIA GPUs (Triton) and runs interpreted '
      f'on CPU for tests, not on {platform.kind}; use model.attention=blockwise'
    )
  reasons = {
    'xla': 'dense einsum attention (the reference)',
    'blockwise': 'XLA online softmax over key blocks, linear memory',
    'pallas': 'our Pallas flash kernel'
    + (' in interpret mode (CPU: slow, for tests)' if platform.kind == 'cpu' else ''),
    'cudnn': f'cuDNN fused flash attention on sm{_sm(platform)}'
    + (' with packed documents (not verified on a GPU yet)' if documents else ''),
  }
  return Choice(requested, f'as configured: {reasons[requested]}')


def _sm(platform: Platform) -> str:
  return f'{int(platform.compute_capability * 10)}'


def _cudnn_blocker(platform, compute_dtype, head_dim, documents, self_attention):
  """Why cuDNN cannot serve this case, or None."""
  if platform.kind != 'gpu':
    return f'cuDNN attention needs an NVIDIA GPU, this is {platform.kind}'
  if platform.compute_capability < 9.0:
    return f'k2jax uses cuDNN attention on sm90+ only, this GPU is sm{_sm(platform)}'
  if compute_dtype not in ('bfloat16', 'float16'):
    return f'cuDNN attention needs bf16/fp16 compute, model.dtype={compute_dtype}'
  if head_dim % 8 or head_dim > 256:
    return f'cuDNN attention needs a head dim that is a multiple of 8 up to 256, got {head_dim}'
  if not self_attention:
    return (
      'queries and keys are different tokens (context parallelism) and JAX exposes no '
      'bottom-right causal mask for cuDNN'
    )
  return None


def dense_score_bytes(batch: int, heads: int, q_length: int, kv_length: int) -> float:
  """Bytes of one layer's fp32 scores and probabilities in the dense reference."""
  return 2.0 * 4 * batch * heads * q_length * kv_length


def check_fits(choice: Choice, platform: Platform, *, batch: int, heads: int, length: int):
  """Refuses, before compiling, the dense reference where its scores cannot fit a GPU."""
  if choice.name != 'xla' or platform.kind != 'gpu':
    return
  need = dense_score_bytes(batch, heads, length, length)
  limit = XLA_MAX_MEMORY_SHARE * platform.memory_bytes
  if need > limit:
    raise ValueError(
      f'model.attention=xla at {length} tokens needs {need / 2**30:,.1f} GiB per device for one '
      f"layer's attention scores ({batch} row(s) x {heads} head(s) x {length}^2 x fp32 x 2), "
      f'over {XLA_MAX_MEMORY_SHARE:.0%} of the {platform.memory_bytes / 2**30:,.0f} GiB device; '
      'use model.attention=auto (cudnn or pallas)'
    )


def backend(name: str, *, block_q=None, block_kv=None, documents=True):
  """The attention function of backend `name` (not `auto`), its options bound."""
  blocks = {k: v for k, v in dict(block_q=block_q, block_kv=block_kv).items() if v is not None}
  if name == 'xla':
    from k2jax.model.kernels.reference import dense_attention

    return context.shard_attention(dense_attention, custom_call=False)
  if name == 'blockwise':
    from k2jax.model.kernels.blockwise import blockwise_attention

    return context.shard_attention(
      functools.partial(blockwise_attention, **blocks), custom_call=False
    )
  # Custom calls: XLA cannot partition them, so they always run per device.
  if name == 'pallas':
    from k2jax.model.kernels.pallas_gpu import pallas_attention

    return context.shard_attention(functools.partial(pallas_attention, **blocks), custom_call=True)
  if name == 'cudnn':
    from k2jax.model.kernels.cudnn import cudnn_attention

    return context.shard_attention(
      functools.partial(cudnn_attention, documents=documents), custom_call=True
    )
  raise ValueError(f'model.attention={name!r} is not a backend; choose one of {"|".join(NAMES)}')


def for_model(cfg, length: int):
  """The backend a ModelConfig asks for, at `length` tokens of self-attention."""
  name = cfg.attention
  if name == 'auto':
    name = choose(
      'auto',
      Platform.current(),
      q_length=length,
      kv_length=length,
      compute_dtype=cfg.dtype,
      head_dim=cfg.head_dim,
      documents=cfg.documents,
    ).name
  return backend(
    name, block_q=cfg.attention_block_q, block_kv=cfg.attention_block_kv, documents=cfg.documents
  )
