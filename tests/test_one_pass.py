"""One attention pass: the engine produces each tapped layer's attention output itself.

With ``attention_pass="fused"`` the taps that hold q, k and v (transformers, timm, open_clip)
take the layer's output from the probability blocks the metrics read (``P_block @ V``) instead
of the model's SDPA. The model must not notice: every block's output and the final output match
the untapped model to float32 rounding, at a short and at a long sequence, and the metric values
match the separate path (the model's kernel, then the metrics recompute). The measured maximum
relative differences (max |fused - plain| / max |plain|, float32, tiny randomized models; on CPU
the blocks go through the C row kernel, probekit/engine/kernels/cpu.py) are asserted below ``REL``; on
this CPU they came out at:

    family        short: layers / final (T)    long: layers / final (T)
    transformers  2.1e-7 / 3.0e-7 (21)          4.4e-7 / 5.2e-7 (1029)
    timm          2.4e-7 / 3.5e-7 (17)          3.4e-7 / 4.7e-7 (1025)
    open_clip     3.3e-7 / 3.5e-7 (17)          4.3e-7 / 6.7e-7 (1025)

Metric values differ from the separate path by at most 1.1e-6 (relative; 2.1e-7 to 1.1e-6 per
family and length), from the kernel's own exp and summation order, blocks that start at row 0
instead of the first patch row, and inputs of later layers that differ by the rounding above.
With PyTorch's blocks instead of the C kernel (no C compiler) the layer outputs differed by at
most 5.2e-7 and the metric values by 3.4e-7.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import probekit as pk
from probekit.engine.kernels import cpu as cpu_kernel
from probekit.attention import LayerAttention
from probekit.engine.kernels.policy import one_pass
from probekit.errors import ConfigError
from probekit.plugins.adapters._sdpa_spy import tap_blocks
from probekit.engine.probe import MetricSink, build_metrics
from probekit.testing import randomize_parameters

REL = 5e-6  # float32 rounding of a different summation order, through 2 layers
METRICS = ["mad", "entropy", "prefix_mass"]
BLOCK_MB = 0.5  # several blocks per layer at the long length
randomize = functools.partial(randomize_parameters, scale=0.2)

SHORT, LONG = 32, 128  # image sizes: 4x4 grid of 8 px patches, 32x32 grid of 4 px patches


def _hf(size, patch):
    return pk.load("hf:facebook/dinov2-with-registers-small", pretrained=False,
                   config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                           "intermediate_size": 64, "image_size": size, "patch_size": patch})


def _timm(size, patch):
    return pk.load("timm:vit_base_patch16_224", pretrained=False, embed_dim=32, depth=2, num_heads=2,
                   patch_size=patch, img_size=size)


def _open_clip(size, patch):
    return pk.load("open_clip:ViT-B-16", pretrained=False, embed_dim=16,
                   vision_cfg=dict(image_size=size, patch_size=patch, width=32, layers=2, head_width=16),
                   text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1))


BUILD = {"transformers": _hf, "timm": _timm, "open_clip": _open_clip}
LENGTHS = {"short": (SHORT, 8), "long": (LONG, 4)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _final(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _run(pm, x, sink=None):
    """Each block's output and the final output, with ``sink`` tapped (None: the untapped model)."""
    seen = {}
    blocks = pm.adapter.blocks if hasattr(pm.adapter, "blocks") else None
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, _final(o).clone()))
             for i, b in enumerate(blocks)]
    try:
        with torch.inference_mode():
            if sink is None:
                out = pm.adapter.forward(x)
            else:
                with pm.adapter.tap(sink):
                    sink.start(pm.layout(x))
                    out = pm.adapter.forward(x)
                    values = sink.finish()
                return seen, _final(out), values
    finally:
        for h in hooks:
            h.remove()
    return seen, _final(out), None


class _Counting(MetricSink):
    """Counts the layers whose output the sink produced."""

    produced = 0

    def attention(self, layer, attn):
        out = super().attention(layer, attn)
        self.produced += out is not None
        return out


@pytest.mark.parametrize("length", list(LENGTHS))
@pytest.mark.parametrize("family", list(BUILD))
def test_fused_layers_match_the_untapped_model(family, length):
    size, patch = LENGTHS[length]
    torch.manual_seed(0)
    pm = BUILD[family](size, patch)
    randomize(pm.model)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    plain_blocks, plain_out, _ = _run(pm, x)
    fused = _Counting(build_metrics(METRICS), attention_pass="fused", block_mb=BLOCK_MB)
    blocks, out, values = _run(pm, x, fused)
    assert fused.produced == pm.num_layers  # the one pass really ran on every layer
    worst = max(_rel(blocks[i], plain_blocks[i]) for i in plain_blocks)
    assert worst < REL, f"{family} {length}: layer outputs differ by {worst:.1e}"
    assert _rel(out, plain_out) < REL
    separate = _Counting(build_metrics(METRICS), attention_pass="separate", block_mb=BLOCK_MB)
    _, _, ref = _run(pm, x, separate)
    assert separate.produced == 0
    for label, per_layer in ref.items():
        for layer, v in per_layer.items():
            torch.testing.assert_close(values[label][layer], v, rtol=1e-5, atol=1e-6)


def test_probe_results_are_the_same_either_way():
    pm = _timm(LONG, 8)
    randomize(pm.model)
    x = torch.randn(2, 3, LONG, LONG, generator=torch.Generator().manual_seed(2))
    a = pk.probe(pm, x, metrics=["mad", "entropy"], attention_pass="fused", block_mb=0.1).table
    b = pk.probe(pm, x, metrics=["mad", "entropy"], attention_pass="separate").table
    assert len(a) == len(b) == 2 * 2 * 2 * 2
    torch.testing.assert_close(torch.tensor(a.value.to_numpy()), torch.tensor(b.value.to_numpy()), rtol=1e-5,
                               atol=1e-6)


class _GroupedMasked(nn.Module):
    """An attention calling SDPA with fewer k/v heads (grouped queries) and a boolean mask."""

    def __init__(self, heads=4, kv_heads=2, dim=8):
        super().__init__()
        self.heads, self.kv_heads, self.dim = heads, kv_heads, dim
        self.attn_drop = nn.Identity()

    def forward(self, x, mask):
        b, t, _ = x.shape
        q = x[..., : self.heads * self.dim].reshape(b, t, self.heads, self.dim).transpose(1, 2)
        kv = x[..., self.heads * self.dim:].reshape(b, t, 2, self.kv_heads, self.dim).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask, enable_gqa=True)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _GroupedMasked()

    def forward(self, x, mask):
        return self.attn(x, mask)


def test_spy_fuses_grouped_queries_with_a_mask_and_keeps_prefix_rows():
    t = 1 + 12  # a CLS row the metrics skip: its output must still be produced
    x = torch.randn(2, t, (4 + 2 * 2) * 8)
    mask = torch.rand(2, 1, t, t) > 0.3
    mask[..., 0] = True  # every row sees at least one key
    block = _Block()
    with torch.inference_mode():
        plain = block(x, mask)
        sink = _Counting(build_metrics(["mad", "entropy"]), attention_pass="fused", block_mb=1e-3)
        with tap_blocks([block], sink):
            sink.start(pk.TokenLayout(num_prefix=1, grid=(3, 4), patch_size=(16, 16)))
            fused = block(x, mask)
            values = sink.finish()
    assert sink.produced == 1
    assert _rel(fused, plain) < REL
    assert torch.isfinite(values["entropy"][0]).all() and values["mad"][0].shape == (2, 4)


def test_autocast_output_has_the_dtype_the_model_expects():
    pm = _timm(SHORT, 8)
    x = torch.randn(1, 3, SHORT, SHORT)
    dtypes = []

    class Keep(MetricSink):
        def attention(self, layer, attn):
            out = super().attention(layer, attn)
            dtypes.append(out.dtype)
            return out

    with torch.autocast("cpu", dtype=torch.bfloat16):
        _run(pm, x, Keep(build_metrics(["mad"]), attention_pass="fused"))
    assert dtypes == [torch.bfloat16] * 2


def test_auto_rule_and_forcing(monkeypatch):
    def attn(t, v=True):
        q = torch.zeros(1, 1, t, 4)
        return LayerAttention(q=q, k=q, v=q if v else None)

    assert not one_pass(attn(50))  # short: the model's SDPA wins on CPU
    assert one_pass(attn(101)) and one_pass(attn(197)) and one_pass(attn(785))
    monkeypatch.setattr(cpu_kernel, "library", lambda: None)  # no C compiler: the PyTorch blocks
    assert not one_pass(attn(101)) and one_pass(attn(197))
    monkeypatch.undo()
    assert one_pass(attn(197), "fused") and not one_pass(attn(785), "separate")
    assert not one_pass(attn(785, v=False), "fused")  # a tap without v cannot take the output
    with pytest.raises(ConfigError, match="attention_pass must be one of auto, fused, separate, kernel"):
        MetricSink(build_metrics(["mad"]), attention_pass="fast")
