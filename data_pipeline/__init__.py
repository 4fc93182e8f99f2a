"""Data input for k2jax: tokenizers, the bundled demo corpus and Grain pipelines.

The training loop only needs `pipeline.build` and `pipeline.tokenizer_for`.
"""
