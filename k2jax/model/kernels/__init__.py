"""Attention backends behind one interface (see reference.py for the contract).

  xla        reference.py   dense einsum, O(L^2) memory: the reference every other backend is tested against
  blockwise  blockwise.py   XLA online softmax over key/value blocks, linear memory (CPU, planner)
  pallas     pallas_gpu.py  our flash-attention kernel in Pallas/Triton for NVIDIA GPUs
  cudnn      cudnn.py       JAX's cuDNN fused attention (sm90)

select.py maps `model.attention` (one of these, or `auto`) to a backend for the platform and
lengths at hand, and says why.
"""
