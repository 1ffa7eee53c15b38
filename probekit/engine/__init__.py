"""The engine: runs a model with its taps and reduces every tapped layer with the metrics.

- :mod:`probekit.engine.probe`: ``pk.probe`` (the local engine, the reference);
- :mod:`probekit.engine.sink`: the metric sink a tap reports each layer to;
- :mod:`probekit.engine.grouped`: windowed, pooled and class-attention layers, a few groups at a time;
- :mod:`probekit.engine.arguments`: argument checks that answer before any model loads;
- :mod:`probekit.engine.kernels`: the row-terms type, the one-pass rule, the torch, C and Triton kernels.
"""
