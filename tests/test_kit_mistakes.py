"""The adapter kit on a hand-written lucidrains-style ViT (4 px patches, CLS token, fixed position
table) and on copies of its adapter with one deliberate mistake each: every mistake must fail
``check_adapter`` with a message that names it, and the correct adapter must pass, with no
reference of its own (the kit reads the model's softmax calls).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import pytest
import torch
import torch.nn.functional as F
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
from probekit.tokens import prefix_first


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
    """lucidrains' vit-pytorch ViT, reduced: patches flattened row by row, CLS first (``cls_last``: after
    the patches), dropout in the MLP."""

    def __init__(self, image_size=(28, 36), patch=4, dim=32, depth=2, heads=2, dim_head=16, dropout=0.0,
                 cls_last=False):
        super().__init__()
        self.cls_last = cls_last
        self.patch, self.grid = patch, (image_size[0] // patch, image_size[1] // patch)
        self.to_patch = nn.Sequential(nn.LayerNorm(3 * patch * patch), nn.Linear(3 * patch * patch, dim), nn.LayerNorm(dim))
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + self.grid[0] * self.grid[1], dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head),
                           nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout),
                                         nn.Linear(2 * dim, dim))])
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, img):
        b, c, h, w = img.shape
        p = self.patch
        x = img.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), -1)
        tokens = [self.cls.expand(b, -1, -1), self.to_patch(x)]
        x = torch.cat(tokens[::-1] if self.cls_last else tokens, 1) + self.pos
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


MEAN, STD = (0.2, 0.3, 0.4), (0.25, 0.2, 0.15)  # the statistics the model would be trained with


def preprocess(size=(28, 36), mean=MEAN, std=STD):
    from torchvision import transforms as T

    return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])


class LucidAdapter(pk.Adapter):
    """A correct adapter: q and k from ``to_qkv``'s output, hidden states at the next norm's input."""

    name = "lucid"
    variable_image_size = False  # a fixed position table
    image_mean, image_std = MEAN, STD

    def __init__(self, model, preprocess=preprocess(), **info):
        super().__init__(model, preprocess, **info)

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

    def tokens(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """The model's tokens in the layout's order (the class token first): they already are."""
        return t

    def attention_of(self, layer: int) -> Attention:
        return self.model.layers[layer][0]

    def hidden_hooks(self, sink):
        """Block i's output is what block i + 1's attention norm (or the final norm) reads."""
        norms = [attn.norm for attn, _ in self.model.layers[1:]] + [self.model.norm]
        return [n.register_forward_pre_hook(lambda m, a, i=i: sink.hidden(i, self.tokens(a[0], 1))
                                            if wants(sink, i) else None)
                for i, n in enumerate(norms)]

    @contextmanager
    def tap(self, sink):
        handles = []
        for i in range(self.num_layers):
            attn = self.attention_of(i)
            if sink.wants_attention and wants(sink, i):
                def report(m, a, out, i=i, attn=attn):
                    b, n, _ = out.shape
                    q, k, _v = (self.tokens(t.reshape(b, n, attn.heads, -1).transpose(1, 2), 2)
                                for t in out.chunk(3, -1))
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


def _pre_hooks(sink, modules):
    """Each module's input handed over as layer i's hidden state."""
    return [m.register_forward_pre_hook(lambda m, a, i=i: sink.hidden(i, a[0]) if wants(sink, i) else None)
            for i, m in enumerate(modules)]


class BlockInput(LucidAdapter):
    def hidden_hooks(self, sink):  # each block's input (what its own attention's norm reads): one block behind
        return _pre_hooks(sink, [attn.norm for attn, _ in self.model.layers])


class Halfway(LucidAdapter):
    def hidden_hooks(self, sink):  # the MLP norm's input, x + attention: the MLP half is missing
        return _pre_hooks(sink, [ff[0] for _, ff in self.model.layers])


class OffByOne(LucidAdapter):
    def attention_of(self, layer):  # block l + 1's attention reported as layer l (the last wraps around)
        return self.model.layers[(layer + 1) % self.num_layers][0]


class ClsLast(LucidAdapter):
    """Correct for a model whose class token comes last: q, k and hidden states handed over class token
    first, the order TokenLayout describes."""

    def tokens(self, t, dim):
        return prefix_first(t, 1, dim)


class ClsLastHiddenKept(ClsLast):
    def hidden_hooks(self, sink):  # attention reordered, hidden states left in the model's order
        return _pre_hooks(sink, [attn.norm for attn, _ in self.model.layers[1:]] + [self.model.norm])


class TrainMode(LucidAdapter):
    """A loader that leaves the model in train mode, and an evaluating() that does not put it in eval."""

    def __init__(self, model, **kw):
        super().__init__(model, **kw)
        self.model.train()

    def evaluating(self):
        return nullcontext()


class AlwaysDropout(nn.Module):
    def forward(self, x):
        return F.dropout(x, 0.1)  # training=True by default: active in eval mode too


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
    assert {"check_patch_geometry", "check_hidden_is_block_output", "check_eval_mode", "check_preprocess"} <= set(by)
    assert "found by perturbation" in by["check_hidden_is_block_output"].reason


@pytest.mark.parametrize("adapter, check, words", [
    (Transposed, "check_patch_geometry", "rows and columns are swapped"),
    (Patch16, "check_patch_geometry", "check the patch size"),
    (TwoPrefix, "check_patch_geometry", "the prefix count is wrong (the layout says 2, the model has 1)"),
    (NoScale, "check_reference_attention", "a wrong or missing softmax scale"),
    (NoResidual, "check_hidden_is_block_output", "not a branch such as the MLP output alone"),
])
def test_each_mistake_fails_and_is_named(lucid, adapter, check, words):
    failed, _ = _failures(adapter, lucid)
    assert check in failed, failed
    assert words in failed[check], failed[check]
    with pytest.raises(AssertionError, match="conformance check"):
        check_adapter(adapter(lucid))


@pytest.mark.parametrize("adapter, said", [
    (BlockInput, {"check_hidden_is_block_output": "it is block 0's input (what layer 0's own attention reads), one "
                                                  "block behind"}),
    (Halfway, {"check_hidden_is_block_output": "taken halfway through block 0, the MLP half is missing"}),
    (OffByOne, {"check_reference_attention": "layer index off by one: your layer 0 matches the reference's 1",
                "check_patch_geometry": "the tap is not the model's attention: layer index off by one",
                "check_hidden_is_block_output": "are the tap's layers the model's"}),
])
def test_hidden_state_and_layer_index_mistakes_are_named(lucid, adapter, said):
    # the hidden state one block behind or halfway through a block is the input of some norm the model
    # calls, as the block's output is: only the norm that feeds the next attention (found by perturbing
    # each norm's input) tells them apart
    failed, _ = _failures(adapter, lucid)
    assert set(failed) == set(said), failed
    for check, words in said.items():
        assert words in failed[check], failed[check]


def test_train_mode_and_active_dropout_are_named():
    model = LucidViT(dropout=0.1)
    randomize_parameters(model, seed=0, scale=0.3)
    failed, _ = _failures(TrainMode, model)
    said = failed.pop("check_eval_mode")
    assert said.startswith("AssertionError: TrainMode: the model is in train mode / dropout active: call model.eval()")
    assert "layers.0.1.3 (Dropout)" in said and "TrainMode.evaluating() must put every module in eval mode" in said
    assert failed, "train mode moves the attention: other checks fail too"
    assert all("check_eval_mode failed: the model is in train mode" in why for why in failed.values()), failed

    model.eval()
    model.layers[0][1][3] = AlwaysDropout()  # a functional dropout that ignores eval mode
    failed, _ = _failures(LucidAdapter, model)
    assert "active dropout: F.dropout(p=0.1, training=True)" in failed["check_eval_mode"], failed


@pytest.fixture(scope="module")
def cls_last():
    torch.manual_seed(0)
    m = LucidViT(cls_last=True).eval()
    return randomize_parameters(m, seed=0, scale=0.3)


def test_class_token_last(cls_last):
    # TokenLayout orders prefix tokens first; a tap that moves the model's class token to the front of q,
    # k and the hidden states is correct, and passes with the model's own softmax (in its own order) as
    # the reference
    failed, records = _failures(ClsLast, cls_last)
    assert not failed, failed
    reason = {r.check: r.reason for r in records}["check_reference_attention"]
    assert "the model's last 1 token(s) (the prefix it appends) are the tap's first" in reason
    # left in the model's order, the layout is wrong, and the kit says why in one line
    failed, _ = _failures(LucidAdapter, cls_last)
    assert set(failed) == {"check_patch_geometry"}, failed
    assert ("it puts 1 of its 1 prefix token(s) after the patches (a class token last), and TokenLayout orders "
            "prefix tokens first: move them to the front of q, k and the hidden states") in failed["check_patch_geometry"]
    # the attention reordered, the hidden states not: their order is checked as the attention's is
    failed, _ = _failures(ClsLastHiddenKept, cls_last)
    assert set(failed) == {"check_hidden_is_block_output"}, failed
    assert ("the hidden states are not in the layout's token order (as the attention is): hidden token 0 is what "
            "layer 1's attention has at token 1. The hidden states are in the model's own token order"
            in failed["check_hidden_is_block_output"])


def test_a_missing_scale_is_not_blamed_on_the_patch_size():
    # wider heads (scale 1/8): without it, layer 0 is so peaked that the geometry check fails too, and it
    # must name the scale, not the layout; a wrong patch size must not be blamed on the scale
    model = LucidViT(dim_head=64).eval()
    randomize_parameters(model, seed=0, scale=0.3)
    failed, _ = _failures(NoScale, model)
    assert set(failed) == {"check_reference_attention", "check_patch_geometry"}, failed
    for why in failed.values():
        assert "the tapped logits are 8x the reference's, a wrong or missing softmax scale" in why, why
        assert "patch size" not in why and "patches are smaller" not in why, why
    failed, _ = _failures(Patch16, model)
    assert "check the patch size" in failed["check_patch_geometry"]
    assert not any("scale" in why for why in failed.values()), failed


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
