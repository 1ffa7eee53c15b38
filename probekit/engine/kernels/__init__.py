"""Kernels that make a block's softmax and the per-row sums the metrics read
(:class:`probekit.metric.terms.RowTerms`).

- :mod:`probekit.engine.kernels.policy`: which attention pass runs (the one-pass rule);
- :mod:`probekit.engine.kernels.block_terms`: the PyTorch blocks;
- :mod:`probekit.engine.kernels.cpu`: the C row kernel (``_cpu_rows.c``), built at first use;
- :mod:`probekit.engine.kernels.triton`: the fused Triton kernel (CUDA; CPU under the interpreter).
"""
