"""The adapter kit on a hand-written lucidrains-style ViT (4 px patches, CLS token, fixed position
table) and on copies of its adapter with one deliberate mistake each: every mistake must fail
``check_adapter`` with a message that names it, and the correct adapter must pass, with no
reference of its own (the kit reads the model's softmax calls).
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch import nn

import probekit as pk
from probekit.adapter import wants
from probekit.attention import LayerAttention
from probekit.testing import check_adapter, randomize_parameters
from probekit.testing.geometry import (
    coverage_problem,
    diagnose_moves,
    expected_moved_tokens,
    moved_tokens,
    patch_box,
)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.attend = nn.Softmax(dim=-1)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.to_qkv(self.norm(x)).chunk(3, -1))
        attn = self.attend(q @ k.transpose(-1, -2) * self.scale)
        return self.to_out((attn @ v).transpose(1, 2).reshape(b, n, -1))


class LucidViT(nn.Module):
    """lucidrains' vit-pytorch ViT, reduced: patches flattened row by row, CLS first."""

    def __init__(self, image_size=(28, 36), patch=4, dim=32, depth=2, heads=2, dim_head=16):
        super().__init__()
        self.patch, self.grid = patch, (image_size[0] // patch, image_size[1] // patch)
        self.to_patch = nn.Sequential(nn.LayerNorm(3 * patch * patch), nn.Linear(3 * patch * patch, dim), nn.LayerNorm(dim))
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + self.grid[0] * self.grid[1], dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head),
                           nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))])
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, img):
        b, c, h, w = img.shape
        p = self.patch
        x = img.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), -1)
        x = torch.cat([self.cls.expand(b, -1, -1), self.to_patch(x)], 1) + self.pos
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


class LucidAdapter(pk.Adapter):
    """A correct adapter: q and k from ``to_qkv``'s output, hidden states at the next norm's input."""

    name = "lucid"
    variable_image_size = False  # a fixed position table

    @classmethod
    def from_spec(cls, name, **options):
        raise NotImplementedError

    @property
    def num_layers(self):
        return len(self.model.layers)

    @property
    def num_heads(self):
        return self.model.layers[0][0].heads

    @property
    def default_image_size(self):
        g, p = self.model.grid, self.model.patch
        return (g[0] * p, g[1] * p)

    def layout(self, pixel_values):
        p = self.model.patch
        h, w = pixel_values.shape[-2:]
        return pk.TokenLayout(num_prefix=1, grid=(h // p, w // p), patch_size=(p, p))

    def scale(self, attn: Attention) -> float:
        return attn.scale

    def hidden_hooks(self, sink):
        """Block i's output is what block i + 1's attention norm (or the final norm) reads."""
        norms = [attn.norm for attn, _ in self.model.layers[1:]] + [self.model.norm]
        return [n.register_forward_pre_hook(lambda m, a, i=i: sink.hidden(i, a[0]) if wants(sink, i) else None)
                for i, n in enumerate(norms)]

    @contextmanager
    def tap(self, sink):
        handles = []
        for i, (attn, _) in enumerate(self.model.layers):
            if sink.wants_attention and wants(sink, i):
                def report(m, a, out, i=i, attn=attn):
                    b, n, _ = out.shape
                    q, k, _v = (t.reshape(b, n, attn.heads, -1).transpose(1, 2) for t in out.chunk(3, -1))
                    sink.attention(i, LayerAttention(q=q, k=k, scale=self.scale(attn)))
                handles.append(attn.to_qkv.register_forward_hook(report))
        if sink.wants_hidden:
            handles += self.hidden_hooks(sink)
        try:
            yield
        finally:
            for h in handles:
                h.remove()


class Transposed(LucidAdapter):
    def layout(self, pixel_values):  # (w, h): invisible on square inputs
        lay = super().layout(pixel_values)
        return pk.TokenLayout(lay.num_prefix, lay.grid[::-1], lay.patch_size)


class Patch16(LucidAdapter):
    def layout(self, pixel_values):  # the grid from the token count, the patch size copied from ViT-B/16
        lay = super().layout(pixel_values)
        return pk.TokenLayout(lay.num_prefix, lay.grid, 16)


class TwoPrefix(LucidAdapter):
    def layout(self, pixel_values):
        lay = super().layout(pixel_values)
        return pk.TokenLayout(2, lay.grid, lay.patch_size)


class NoScale(LucidAdapter):
    def scale(self, attn):
        return 1.0


class NoResidual(LucidAdapter):
    def hidden_hooks(self, sink):  # the MLP branch, without the residual stream added
        return [ff.register_forward_hook(lambda m, a, out, i=i: sink.hidden(i, out) if wants(sink, i) else None)
                for i, (_, ff) in enumerate(self.model.layers)]


@pytest.fixture(scope="module")
def lucid():
    torch.manual_seed(0)
    m = LucidViT().eval()
    randomize_parameters(m, seed=0, scale=0.3)
    return m


def _failures(adapter_cls, model):
    records = check_adapter(adapter_cls(model), on_fail=None)
    return {r.check: r.reason for r in records if r.status == "failed"}, records


def test_correct_adapter_passes_without_a_reference(lucid):
    failed, records = _failures(LucidAdapter, lucid)
    assert not failed, failed
    by = {r.check: r for r in records}
    assert "the model's own softmax" in by["check_reference_attention"].reason  # the kit read the model
    assert {"check_patch_geometry", "check_hidden_is_block_output"} <= set(by)


@pytest.mark.parametrize("adapter, check, words", [
    (Transposed, "check_patch_geometry", "rows and columns are swapped"),
    (Patch16, "check_patch_geometry", "check the patch size"),
    (TwoPrefix, "check_patch_geometry", "the prefix count is wrong (the layout says 2, the model has 1)"),
    (NoScale, "check_reference_attention", "a wrong or missing softmax scale"),
    (NoResidual, "check_hidden_is_block_output", "not the blocks' outputs"),
])
def test_each_mistake_fails_and_is_named(lucid, adapter, check, words):
    failed, _ = _failures(adapter, lucid)
    assert check in failed, failed
    assert words in failed[check], failed[check]
    with pytest.raises(AssertionError, match="conformance check"):
        check_adapter(adapter(lucid))


def test_moved_tokens_and_diagnoses(lucid):
    # the measurement the geometry check rests on, and the words for a column-major or shifted order
    base = LucidAdapter(lucid)
    x = torch.randn(1, 3, 28, 36)
    lay = base.layout(x)
    moves = {}
    for r, c in [(0, 1), (1, 0), (6, 8)]:
        y0, y1, x0, x1 = patch_box(lay, r, c)
        x2 = x.clone()
        x2[..., y0:y1, x0:x1] += 3 * torch.randn(1, 3, y1 - y0, x1 - x0)
        moves[(r, c)] = moved_tokens(base_probs(base, x), base_probs(base, x2))[0]
        assert moves[(r, c)] == expected_moved_tokens(lay, (y0, y1, x0, x1)) == {1 + r * 9 + c}
    swapped = pk.TokenLayout(1, (9, 7), 4)  # a 9x7 layout over the model's 7x9 grid
    assert "rows and columns swapped" in diagnose_moves(swapped, {rc: frozenset({1 + rc[0] * 9 + rc[1]}) for rc in moves})
    column_major = {rc: frozenset({1 + rc[1] * 7 + rc[0]}) for rc in moves}
    assert "the grid is transposed" in diagnose_moves(lay, column_major)
    shifted = {rc: frozenset({t + 2 for t in v}) for rc, v in moves.items()}
    assert "the layout says 1, the model has 3" in diagnose_moves(lay, shifted)
    assert "moved up to 2 tokens" in diagnose_moves(lay, {**moves, (0, 1): frozenset({2, 3})})
    assert moved_tokens(base_probs(base, x), base_probs(base, x))[0] == frozenset()


def base_probs(adapter, x):
    with torch.no_grad():
        return pk.ProbedModel(adapter, "lucid").attention(x, layers=[0])[0][0]


def test_coverage_problem_words():
    lay = pk.TokenLayout(1, (9, 7), 4)
    assert "rows and columns are swapped" in coverage_problem(lay, (28, 36))
    assert coverage_problem(pk.TokenLayout(1, (7, 9), 4), (28, 36)) is None
    assert coverage_problem(pk.TokenLayout(1, (7, 9), 4), (30, 37)) is None  # floored border pixels
    assert "grid would be 1x2" in coverage_problem(pk.TokenLayout(1, (7, 9), 16), (28, 36))


class _LogSumExpSoftmax(nn.Module):
    def forward(self, t):
        return torch.exp(t - t.logsumexp(-1, keepdim=True))


def test_undeclared_skip_fails_and_declared_one_does_not(lucid):
    class NoSoftmaxSeen(LucidAdapter):
        pass

    model = LucidViT(depth=2).eval()
    model.layers[0][0].attend = _LogSumExpSoftmax()  # no softmax call to read
    records = {r.check: r for r in check_adapter(NoSoftmaxSeen(model), on_fail=None)}
    rec = records["check_reference_attention"]
    assert rec.status == "failed" and "could not run" in rec.reason and "not_applicable_checks" in rec.reason

    class Declared(NoSoftmaxSeen):
        not_applicable_checks = {"check_reference_attention": "tested against vit-pytorch at export"}

    records = {r.check: r for r in check_adapter(Declared(model), on_fail=None)}
    assert records["check_reference_attention"].status == "skipped"
    assert "vit-pytorch" in records["check_reference_attention"].reason


def test_fixed_size_model_left_variable_is_told_what_to_set(lucid):
    class LeftAtDefault(LucidAdapter):
        variable_image_size = True  # the Adapter default, on a model with a fixed position table

    failed, _ = _failures(LeftAtDefault, lucid)
    sized = {c: r for c, r in failed.items() if "image_size=" in c}
    assert sized and set(failed) == set(sized), failed  # only the non-native variants fail
    for reason in sized.values():
        assert "set variable_image_size = False on LeftAtDefault" in reason, reason
        assert "its native size is 28x36" in reason
