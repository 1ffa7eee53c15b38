"""Which attention pass the engine takes for a tapped layer (``attention_pass=``).

One pass: where a tap hands over ``v``, the engine produces the layer's output itself from the
same blocks of probabilities the metrics read; otherwise the model's own kernel runs and the
metrics recompute q·kᵀ (see :mod:`probekit.attention`).
"""

from __future__ import annotations

from probekit.attention import LayerAttention
from probekit.engine.kernels import cpu as cpu_kernel

__all__ = ["ATTENTION_PASSES", "ONE_PASS_MIN_TOKENS", "ONE_PASS_MIN_TOKENS_KERNEL", "one_pass"]

ATTENTION_PASSES = ("auto", "fused", "separate", "kernel")
# auto: one pass on CPU from this many tokens on (measured, see one_pass); always on accelerators
ONE_PASS_MIN_TOKENS_KERNEL = 64  # with the C row kernel (probekit.engine.kernels.cpu)
ONE_PASS_MIN_TOKENS = 150  # without it (no C compiler): the PyTorch blocks


def one_pass(attn: LayerAttention, mode: str = "auto") -> bool:
    """Whether the engine produces this layer's attention output itself (one attention pass).

    ``"separate"``: never (the model's own kernel, then the metrics recompute q·kᵀ).
    ``"fused"``/``"kernel"``: whenever the tap handed over ``v``. ``"auto"``: always on
    accelerators; on CPU from :data:`ONE_PASS_MIN_TOKENS_KERNEL` (64) tokens on where the C row
    kernel built (:mod:`probekit.engine.kernels.cpu`), else from :data:`ONE_PASS_MIN_TOKENS` (150). The
    rule comes from paired runs of fused against separate on this project's 2-core CPU: with the C
    kernel, fused wins from 64 tokens and below that neither wins beyond the VM's noise; with
    PyTorch's blocks, torch's fused SDPA beats float32 ``P @ V`` from the probabilities by more
    than the recomputation it saves until about 150 tokens. Longer sequences gain more.
    Accelerators always take it (their flash kernel is the cheap part; not measured here).
    Measured: benchmarks/RESULTS.md, section "One pass on CPU: the auto rule".
    """
    if mode == "separate" or attn.v is None or attn.probs_given is not None:
        return False
    if mode in ("fused", "kernel"):  # "kernel": layers the Triton kernel did not take
        return True
    if attn.device.type != "cpu":
        return True
    least = ONE_PASS_MIN_TOKENS_KERNEL if cpu_kernel.library() is not None else ONE_PASS_MIN_TOKENS
    return attn.shape[2] >= least
