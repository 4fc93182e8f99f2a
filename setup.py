"""k2jax: K2-V2's training pipeline (pre-training, mid-training, SFT) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
  name='k2jax',
  version='0.1.0',
  description="JAX/Flax training system for large dense LLMs, starting with LLM360's K2-V2",
  python_requires='>=3.10',
  packages=find_packages(
    include=['k2jax', 'k2jax.*', 'data_pipeline', 'data_pipeline.*', 'configs', 'configs.*']
  ),
  package_data={'data_pipeline': ['demo/*', 'demo/sft/*']},
  # Pinned to the versions the test suite ran with.
  install_requires=[
    'jax==0.10.2',
    'flax==0.12.8',
    'optax==0.2.8',
    'orbax-checkpoint==0.12.8',
    'grain==0.2.18',
    'array-record==0.8.6',
    'sentencepiece==0.2.3',
    'tokenizers==0.23.3',  # HF tokenizer.json (K2-V2 ships one)
    'pyarrow==26.0.1',  # parquet sources (TxT360-Midas, TxT360-3efforts)
    'zstandard==0.25.0',  # .jsonl.zst sources
    'fsspec==2026.9.0',  # URLs as data paths (gcs/s3 need gcsfs/s3fs besides)
    'tqdm==4.70.1',  # progress bars of data_pipeline.prepare
    'matplotlib==3.11.2',  # the curves of `python -m k2jax.monitor WORKDIR`
    'tensorstore==0.1.86',
    'clu==0.0.12',  # clu.metrics only: clu.metric_writers would pull in TensorFlow
    'ml-collections==1.1.0',
    'safetensors==0.8.0',
    'absl-py==2.5.1',
    'numpy==2.4.6',
    'tensorboardX==2.6.5',  # TensorBoard event files without TensorFlow
  ],
  extras_require={
    'gpu': ['jax[cuda12]==0.10.2'],
    # The test oracle: HF transformers on a CPU build of torch (2.13.0 is on the
    # machines' disk; an unpinned torch would fetch a multi-GB CUDA build).
    'dev': [
      'pytest==9.2.0',
      'pytest-xdist==3.8.0',
      'torch==2.13.0',
      'transformers==5.23.0',
      'lm-eval==0.4.13',
    ],
    # `python -m k2jax.lm_eval_adapter`: lm-evaluation-harness on k2jax checkpoints.
    'eval': ['lm-eval==0.4.13'],
  },
)
