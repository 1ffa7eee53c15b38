"""The metric contract: reducers over one layer's attention (or hidden states).

A metric's heart is a pure function from one layer's probabilities ``[B, H, T, T]`` and its
:class:`~probekit.tokens.TokenLayout` to per-image values (``[B, H]`` for a per-head scalar,
``[B, H, ...]`` for a map, ``[B]`` or ``[B, ...]`` when not per head). Around it, three
declarations make a plugin metric one the framework can trust:

- **One name.** ``name`` is the registry key, the label's stem and its entry-point name; a
  class whose ``name`` differs from its entry point fails to load.
- **Declared options.** Typed class attributes (``radius: int = 1``, ``units: Literal[...]``,
  constraints as ``Annotated[int, Field(ge=1)]``), validated strictly by pydantic. No
  ``__init__`` parameters: an option the framework cannot see is one the cache key cannot see.
  ``options()`` reports them all, every one is in :attr:`~Metric.label` and the part cache
  key, and ``type(m)(**m.options())`` rebuilds the metric. (:mod:`probekit.metric.options`)
- **Declared state.** ``self.add_state(name, default, reduce=...)`` in ``__init__`` (after
  ``super().__init__(**options)``), as torchmetrics does; reset, merge, state_dict and
  load_state_dict are written once here from the declarations, and every merge path refuses
  another metric's or other options' state. Every metric has the ``values`` state: each
  image's value per layer, which the engine turns into the results table (:meth:`per_image`);
  a dataset-level output (CKA's matrix) comes from :meth:`dataset_result`. Sharded and
  distributed runs combine through exactly this state. (:mod:`probekit.metric.state`)

Row-wise metrics (the default, ``reduces = "rows"``) write their maths once, in
:meth:`Metric.row_values`: per-query-row values from a :class:`~probekit.metric.block.Block`, which
carries what the engine's current path has (probabilities and logits of a block of query rows, or
the kernels' per-row sums, on a global layout or a windowed/pooled geometry; absent pieces are
None). The engine chooses the path, averages the rows over the queries the metric declares
(``query_tokens``), and never holds a full ``[B, H, T, T]`` tensor; a metric with a fast form
reads ``block.terms`` and returns None to be asked again with probabilities. Metrics that need
whole layers declare ``reduces = "layer"`` and override :meth:`Metric.on_attention` (or
:meth:`Metric.on_hidden`); metrics whose state spans layers (rollout, CKA) declare
``reduces = "batch"`` and return their values from :meth:`Metric.on_batch_end`.

Layers that are not one global ``[T, T]`` attention (Swin and SAM windows, MViTv2 pooled keys,
CaiT class attention: :mod:`probekit.geometry`) reach only metrics that say they can describe
them: ``requires`` lists what a metric needs of a layer (:data:`probekit.geometry.REQUIREMENTS`;
``"global"`` by default, so a metric written for global ViTs is never fed windows); a metric
without ``"global"`` reads ``block.geometry`` in its ``row_values``. A layer that lacks a
requirement is refused, with the reason, before the forward pass.

A complete plugin metric (register it with an entry point in group ``probekit.metrics``
named ``peak``, or ``pk.register("metric")`` within one process):

>>> from typing import Literal
>>> import torch, probekit as pk
>>> class PeakAttention(pk.Metric):
...     '''Largest attention probability of each query row, mean over query patches.'''
...     name = "peak"
...     description = "largest attention probability of each query row"
...     unit = "probability"
...     keys: Literal["patches", "all"] = "patches"      # a declared option
...     def row_values(self, block):
...         a = block.probs if self.keys == "all" else block.patch_rows()
...         return a.amax(-1)
>>> m = PeakAttention(keys="all")
>>> m.label, m.options()
('peak[keys=all]', {'keys': 'all'})
>>> lay = pk.TokenLayout(num_prefix=1, grid=(2, 2), patch_size=(16, 16))
>>> m.update(0, m.compute(torch.eye(5).expand(1, 1, 5, 5), lay))   # identity attention: peak 1
>>> m.result()
{0: tensor([1.])}
>>> type(m)(**m.options()).label
'peak[keys=all]'
>>> PeakAttention(keys="some")  # doctest: +ELLIPSIS +NORMALIZE_WHITESPACE
Traceback (most recent call last):
...
probekit.errors.ConfigError: Metric 'peak': option keys='some' is invalid (...); keys must be one of
'patches', 'all'. ...
>>> PeakAttention().merge(m)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
probekit.errors.ConfigError: Cannot merge the state of peak[keys=all] into peak: different metric or options. ...

Prove it with ``probekit.testing.check_metric(PeakAttention())``.
"""


from __future__ import annotations

import copy
import inspect
import warnings
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from probekit.errors import ConfigError
from probekit.metric.block import Block
from probekit.metric.options import defaults as option_defaults
from probekit.metric.options import format_label, validate_options
from probekit.metric.state import REDUCTIONS, reduce_values
from probekit.tokens import TokenLayout

__all__ = ["Metric", "RUN_SETTINGS", "REDUCES", "QUERY_TOKENS"]

#: the run settings a metric may declare in ``depends_on`` (each is a field of a run file)
RUN_SETTINGS = ("batch_size", "seed")
#: what a metric reduces: blocks of query rows, whole layers, or a whole batch (state across layers)
REDUCES = ("rows", "layer", "batch")
#: the query tokens a row-wise metric averages over
QUERY_TOKENS = ("patches", "cls", "all")

#: names of probekit 0.1's metric contract, and what to write instead (docs/plugins.md, "Migrating from 0.1")
_GONE = {
    "row_sum": "fold it into row_values(self, block), which returns per-row values (the engine sums them)",
    "kernel_row_sum": "read the kernel's sums in row_values(self, block) from block.terms (None elsewhere), "
                      "returning None where they cannot answer",
    "window_sum": "read windowed/pooled layers in row_values(self, block) from block.geometry and block.groups "
                  "(per-row values; the engine weights them by block.query_weight)",
    "query_rows": "declare query_tokens = 'patches' | 'cls' | 'all' (a property when an option decides)",
    "geometry_queries": "declare query_tokens = 'patches' | 'cls' | 'all' (a property when an option decides)",
    "requirements": "declare requires (and query_tokens; 'cls' queries add the 'cls' requirement themselves)",
    "requires_global_attention": "declare requires = () (without 'global') instead",
    "uses_logits": "drop it: block.logits is there whenever the engine's path has the logits",
    "rowwise": "declare reduces = 'rows' | 'layer' | 'batch'",
    "cross_layer": "declare reduces = 'batch'",
    "value_unit": "make unit a property when options decide it",
    "compute_hidden": "override on_hidden(self, layer, hidden, layout) and declare reduces = 'layer'",
    "on_batch_start": "reset per-batch scratch in on_batch_end (rollout starts afresh at layer 0)",
    "geometry_reference": "reference_value(self, layer) receives a LayerGeometry as well as a TokenLayout",
    "expected_failed_checks": "declare not_applicable_checks = {check name: reason}, as adapters do",
    "load_state_dict": "merge the state_dict into a fresh instance: type(m)(**m.options()).merge(state)",
    "check_model": "declare requires; the engine refuses models and layers that lack a requirement",
    "check_geometry": "declare requires; the engine refuses models and layers that lack a requirement",
}


class Metric:
    """Base class of attention and hidden-state metrics.

    Class constants (read by the engine, ``probekit metrics`` and ``probekit.testing``); each may
    be a property where the options decide it:

    - ``name``: registry key; ``description``: one-line definition; ``citation``; ``display_name``:
      what axes and tables call the metric (default: ``name``); ``unit`` of the values.
    - ``needs``: ``"attention"`` or ``"hidden"`` (output tokens of each block).
    - ``reduces``: ``"rows"`` (default: :meth:`row_values` per query row, averaged by the engine),
      ``"layer"`` (:meth:`on_attention` / :meth:`on_hidden` return a layer's values) or ``"batch"``
      (state across the layers of a batch; :meth:`on_batch_end` returns the values).
    - ``query_tokens``: the query rows a row-wise value averages over: ``"patches"`` (default),
      ``"cls"`` (the class token; adds the ``"cls"`` requirement) or ``"all"``.
    - ``per_head``: values have a head axis after the batch axis; ``is_map``: further axes
      (stored as arrays, not table rows).
    - ``requires``: what the metric needs of a layer's geometry, from
      :data:`probekit.geometry.REQUIREMENTS` (``"global"``, ``"square"``, ``"patch_queries"``,
      ``"cls"``); layers that lack one are refused with the reason.
    - ``kernel_terms``: the per-query-row sums (:data:`probekit.metric.terms.TERMS`) the metric can
      answer from (``block.terms``); empty (default): the kernels' sums are never offered.
    - ``depends_on``: the run settings (:data:`RUN_SETTINGS`) the values depend on beyond the
      images, the model and the options, e.g. ``("batch_size",)`` for minibatch CKA; their values
      join the part cache key.
    - ``not_applicable_checks``: ``{check name: reason}`` for conformance checks
      (:mod:`probekit.testing`) that do not apply to this metric by design.
    - ``needs_labels``: the metric reads each image's class label (representation probes): the
      engine calls :meth:`on_labels` with the batch's labels before its forward pass, and refuses
      an image set without labels before any forward pass.
    - ``whole_set``: the per-image values compare images with each other (a held-out prediction),
      so they exist only once every image is in: :meth:`per_image` makes them from the merged
      state, a NaN value is no row (an image that was never tested), and a shard of a larger set
      keeps its state and makes no rows.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    display_name: ClassVar[str] = ""  # set to ``name`` for classes that leave it out
    unit: ClassVar[str] = ""
    needs: ClassVar[str] = "attention"
    reduces: ClassVar[str] = "rows"
    query_tokens: ClassVar[str] = "patches"
    per_head: ClassVar[bool] = True
    is_map: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ("global",)
    kernel_terms: ClassVar[frozenset[str]] = frozenset()
    depends_on: ClassVar[tuple[str, ...]] = ()
    not_applicable_checks: ClassVar[dict[str, str]] = {}
    needs_labels: ClassVar[bool] = False
    whole_set: ClassVar[bool] = False
    if TYPE_CHECKING:  # set in __init__ (add_state); annotated at run time they would be declared options
        values: dict[int, list[torch.Tensor]]
        _states: dict[str, tuple[Any, str]]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        gone = [n for n in _GONE if n in cls.__dict__]
        if gone:
            raise TypeError(f"{cls.__name__}.{gone[0]} is probekit 0.1's metric contract: {_GONE[gone[0]]}.")
        rv = cls.__dict__.get("row_values")
        if rv is not None and len(inspect.signature(rv).parameters) != 2:  # (self, block)
            raise TypeError(
                f"{cls.__name__}.row_values{inspect.signature(rv)} is probekit 0.1's signature: write "
                "row_values(self, block) and read block.probs, block.logits, block.layout and block.rows.")
        if not isinstance(cls.depends_on, property):  # a property (options decide) is checked on each instance
            _check_depends_on(cls.__name__, cls.depends_on)
        for attr, allowed in (("reduces", REDUCES), ("query_tokens", QUERY_TOKENS)):
            value = cls.__dict__.get(attr)
            if isinstance(value, str) and value not in allowed:
                raise TypeError(f"{cls.__name__}.{attr} must be one of {allowed}; got {value!r}.")
        if cls.__dict__.get("reduces") in (None, "rows") and cls.reduces == "rows" and cls.needs == "attention" \
                and "on_attention" in cls.__dict__:
            raise TypeError(f"{cls.__name__} overrides on_attention but reduces rows: declare reduces = 'layer' "
                            "(or 'batch' for state across layers), or write row_values(self, block) instead.")
        if not cls.__dict__.get("display_name"):
            cls.display_name = cls.__dict__.get("name") or cls.display_name or cls.name

    _CONSTANTS = ("name", "needs", "reduces", "query_tokens", "per_head", "is_map", "requires", "kernel_terms",
                  "depends_on", "needs_labels", "whole_set")

    def __init__(self, **options: Any):
        """Validate ``options`` against the declared ones (see :mod:`probekit.metric.options`).

        Each option is also set as an attribute (``self.units``), read-only from then on.
        """
        opts = validate_options(type(self), options)
        object.__setattr__(self, "_options", opts)
        for key, value in opts.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "_label", format_label(self.name, opts, option_defaults(type(self))))
        for attr, allowed in (("reduces", REDUCES), ("query_tokens", QUERY_TOKENS)):
            if getattr(self, attr) not in allowed:
                raise TypeError(f"{type(self).__name__}.{attr} must be one of {allowed}; got {getattr(self, attr)!r}.")
        _check_depends_on(type(self).__name__, self.depends_on)
        self.add_state("values", default={}, reduce="cat")  # {layer: [per-image values of a batch]}

    def __setattr__(self, key, value):
        if key in Metric._CONSTANTS:
            raise AttributeError(f"{key!r} is a class constant of {type(self).__name__}; subclass to change it.")
        if key in self.__dict__.get("_options", ()):
            raise AttributeError(
                f"{key!r} is an option of metric {self.name!r}, fixed at construction (it is part of the "
                f"label and cache key): make a new metric, type(m)(**{{**m.options(), {key!r}: ...}})."
            )
        super().__setattr__(key, value)

    # -- identity ---------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """Every declared option and its value: ``type(m)(**m.options())`` is the same metric."""
        return dict(self.__dict__.get("_options", {}))

    @property
    def label(self) -> str:
        """``name``, plus the options that differ from their defaults: ``mad[units=patch]``.

        Made once, at construction (options are fixed then): the engine reads it about ten times
        per layer, and making it each time was a fifth of its Python per layer (issue 25).
        """
        return self.__dict__["_label"]

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"

    def reference_value(self, layer: Any) -> float | None:
        """The metric's value for uniform attention on ``layer`` (a :class:`~probekit.tokens.TokenLayout`,
        or a :class:`~probekit.geometry.LayerGeometry` for windowed, pooled and staged layers), where
        that is a telling reference (figures draw it as a dashed line), or None (the default).

        MAD: the "no locality" distance (116.49 px on 14x14 patches of 16 px, no prefix);
        entropy: ln N, its maximum.
        """
        return None

    # -- the maths ------------------------------------------------------------------------------
    def row_values(self, block: Block) -> torch.Tensor | None:
        """Per-query-row values of one block of rows: ``[n, H, R, ...]`` (``[n, R, ...]`` when not per head).

        ``block`` (:class:`~probekit.metric.block.Block`) carries what the engine's path has:
        ``probs`` and ``logits`` (``[n, H, R, K]`` float32), or the kernels' per-row sums
        (``terms``), on a global ``layout`` (``rows``: absolute token indices within
        ``query_tokens``) or a grouped ``geometry``. Return None where the block lacks what the
        metric needs (e.g. ``terms`` that do not serve these options): the engine asks again
        with probabilities. The engine averages the rows; this is the only place for a row-wise
        metric's maths.
        """
        raise NotImplementedError(f"{type(self).__name__} must define row_values(self, block) (or declare reduces)")

    def compute(self, probs: torch.Tensor, layout: TokenLayout, logits: torch.Tensor | None = None) -> torch.Tensor:
        """One layer's per-image values from full probabilities ``[B, H, T, T]`` (and their logits).

        The plain path every engine path is checked against: :meth:`row_values` on all of the
        metric's query rows at once, then their mean. Metrics that reduce whole layers or
        batches override it.
        """
        if self.reduces != "rows":
            raise NotImplementedError(f"{type(self).__name__} reduces {self.reduces}s: override compute")
        layout.check(probs.shape[-1], where="attention")
        rows = query_span(self, layout)
        block = Block(rows=rows, layout=layout, probs=probs[:, :, rows].float(),
                      logits=None if logits is None else logits[:, :, rows].float())
        values = self.row_values(block)
        if values is None:
            raise RuntimeError(f"{type(self).__name__}.row_values returned None for a block with probabilities: "
                               "None means 'ask again with probabilities', so it must answer here.")
        return block.sum_rows(values, self.per_head) / max(block.num_rows, 1)

    # -- engine hooks (metrics that reduce whole layers or batches) ---------------------------------
    def on_attention(self, layer: int, attn, layout) -> torch.Tensor | None:
        """Per-image values of one layer from its tapped attention (``reduces = "layer"``), or None
        (``reduces = "batch"``: keep state, answer in :meth:`on_batch_end`).

        ``attn`` is the layer's :class:`~probekit.attention.LayerAttention` (``attn.probs(rows)``,
        ``attn.block(rows)`` give float32 probabilities a block of rows at a time); ``layout`` its
        :class:`~probekit.tokens.TokenLayout` (or a :class:`~probekit.geometry.LayerGeometry` for
        metrics whose ``requires`` admit grouped layers).
        """
        return self.compute(attn.probs(), layout)

    def on_hidden(self, layer: int, hidden: torch.Tensor, layout: TokenLayout) -> torch.Tensor | None:
        """Per-image values of one layer from its output tokens ``[B, T, D]`` (hidden metrics), or None
        (``reduces = "batch"``)."""
        raise NotImplementedError(f"{type(self).__name__} must define on_hidden (needs = 'hidden')")

    def on_labels(self, labels: list[str]) -> None:
        """``needs_labels``: the class label of each image of the coming batch, in batch order (the
        engine calls it at the batch's start, before the layers arrive). Keep them in declared
        state (``reduce="cat"``), beside what the layers give, so they merge with the images."""
        raise NotImplementedError(f"{type(self).__name__} declares needs_labels: define on_labels(self, labels)")

    def check_labels(self, labels: list[str]) -> None:
        """``needs_labels``: refuse, with a :class:`ConfigError` saying what to change, the labels of
        a whole image set the metric cannot evaluate (too few images of a class for its folds). The
        engine calls it before the forward pass (a run file: before any model loads); default: any."""

    def on_batch_end(self) -> dict[int, torch.Tensor]:
        """``reduces = "batch"``: per-image values keyed by layer (or -1 for the whole model)."""
        return {}

    # -- declared, mergeable state ------------------------------------------------------------------
    def add_state(self, name: str, default: Any, reduce: str = "sum") -> None:
        """Declare one piece of state: its value after :meth:`reset` and how two partial states combine.

        ``reduce`` is one of ``sum``, ``cat``, ``max``, ``min``, ``same`` (see
        :mod:`probekit.metric.state`); a ``dict`` default is keyed state (e.g. per layer), reduced
        per key. The state is an attribute (``self.<name>``); reset, merge and state_dict handle
        it, so a metric writes none of them.
        """
        if reduce not in REDUCTIONS:
            raise ConfigError(
                f"Metric {self.name!r}: add_state({name!r}, ...) got reduce={reduce!r}; use one of "
                f"{', '.join(map(repr, REDUCTIONS))}."
            )
        if name in self.__dict__.get("_options", {}) or name in Metric._CONSTANTS or name.startswith("__"):
            raise ConfigError(f"Metric {self.name!r}: state {name!r} clashes with an option or class constant.")
        self.__dict__.setdefault("_states", {})[name] = (copy.deepcopy(default), reduce)
        object.__setattr__(self, name, copy.deepcopy(default))

    def reset(self) -> None:
        """Every declared state back to its default."""
        for name, (default, _) in self.__dict__.get("_states", {}).items():
            object.__setattr__(self, name, copy.deepcopy(default))

    def update(self, layer: int, values: torch.Tensor) -> None:
        """Add one batch of per-image values of ``layer`` (``[B, ...]``) to the ``values`` state."""
        self.values.setdefault(layer, []).append(values.detach().float().cpu())

    def per_image(self) -> dict[int, torch.Tensor]:
        """Every image's value per layer, in the order seen (``{layer: [N, H, ...]}``): the table's rows."""
        return {layer: torch.cat(v) for layer, v in sorted(self.values.items())}

    def result(self) -> dict[int, torch.Tensor]:
        """Mean per-image value per layer over everything seen (``{layer: [H, ...]}``)."""
        if not self.values:
            warnings.warn(f"{type(self).__name__}.result() called before any update.", stacklevel=2)
        return {layer: v.double().mean(0).float() for layer, v in self.per_image().items()}

    def dataset_result(self) -> np.ndarray | None:
        """One array for the whole image set (CKA's layer x layer matrix), or None (the default).

        The engine stores it as ``Results.arrays["<model>/<label>"]``; per-image values go to
        the table through :meth:`per_image`.
        """
        return None

    def state_dict(self) -> dict[str, Any]:
        """``{"name", "options", "state": {declared state: value}}`` (copies)."""
        return {
            "name": self.name,
            "options": self.options(),
            "state": {k: copy.deepcopy(getattr(self, k)) for k in self.__dict__.get("_states", {})},
        }

    def merge(self, other: Metric | dict) -> Metric:
        """Fold another instance's state, or a :meth:`state_dict`, into this one; returns self.

        Both refuse another metric or other options (:class:`ConfigError`): merging
        ``mad[units=patch]`` into ``mad`` would average patches with pixels. Restoring a saved
        state is a merge into a fresh instance: ``type(m)(**m.options()).merge(state)``.
        """
        if isinstance(other, Metric) and type(other) is not type(self):
            raise ConfigError(f"Cannot merge {type(other).__name__} {other.label} into "
                              f"{type(self).__name__} {self.label}.")
        state = other.state_dict() if isinstance(other, Metric) else other
        self._check_state(state)
        for name, (_, reduce) in self._states.items():
            try:
                merged = reduce_values(reduce, getattr(self, name), state["state"][name])
            except ConfigError as exc:
                raise ConfigError(f"Cannot merge state {name!r} of {self.label}: {exc}") from None
            object.__setattr__(self, name, merged)
        return self

    def _check_state(self, state: Any) -> None:
        if not isinstance(state, dict) or not {"name", "options", "state"} <= set(state):
            raise ConfigError(f"Cannot merge into {self.label}: {type(state).__name__} is not a metric state_dict "
                              "(name, options, state).")
        opts = dict(state["options"] or {})
        try:
            opts = validate_options(type(self), opts) if state["name"] == self.name else opts
        except ConfigError:
            pass
        if state["name"] != self.name or opts != self.options():
            defaults = option_defaults(type(self)) if state["name"] == self.name else {}
            theirs = format_label(state["name"], opts, defaults)
            raise ConfigError(
                f"Cannot merge the state of {theirs} into {self.label}: different metric or options. Merge only "
                "states of the same metric with the same options."
            )
        if set(state["state"]) != set(self._states):
            raise ConfigError(f"Cannot merge into {self.label}: state {sorted(state['state'])} "
                              f"!= declared {sorted(self._states)}.")


def _check_depends_on(owner: str, depends_on: Any) -> None:
    unknown = [s for s in depends_on if s not in RUN_SETTINGS]
    if isinstance(depends_on, str) or unknown:
        raise TypeError(f"{owner}.depends_on must be a tuple of run settings from {RUN_SETTINGS}; got {depends_on!r}.")


def query_span(metric: Metric, layout: TokenLayout) -> slice:
    """The query rows of ``layout`` a row-wise ``metric`` averages over (its ``query_tokens``)."""
    if metric.query_tokens == "cls":
        i = layout.cls_index(f"metric {metric.name!r}")
        return slice(i, i + 1)
    if metric.query_tokens == "all":
        return slice(0, layout.num_tokens)
    return slice(layout.num_prefix, layout.num_tokens)


def requirements(metric: Metric) -> tuple[str, ...]:
    """What ``metric`` needs of every layer: its ``requires``, and ``"cls"`` for class-token queries."""
    return tuple(metric.requires) + (("cls",) if metric.query_tokens == "cls" and "cls" not in metric.requires else ())
