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

Row-wise metrics (the default) define :meth:`Metric.row_values`, a value per query row; the
engine then feeds them blocks of query rows, so long sequences never hold a full
``[B, H, T, T]`` tensor, and computes each block's probabilities once for all metrics.
Metrics that need whole matrices set ``rowwise = False`` and override :meth:`compute`;
metrics whose state spans layers (rollout, CKA) override the ``on_*`` hooks.

Layers that are not one global ``[T, T]`` attention (Swin and SAM windows, MViTv2 pooled keys,
CaiT class attention: :mod:`probekit.geometry`) reach only metrics that say they can describe
them: ``requires`` lists what a metric needs of a layer (:data:`probekit.geometry.REQUIREMENTS`;
``"global"`` by default, so a metric written for global ViTs is never fed windows), and a metric
without ``"global"`` defines :meth:`Metric.window_sum`. A layer that lacks a requirement is
refused, with the reason, before the forward pass.

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
...     def row_values(self, probs, layout, rows):
...         a = probs if self.keys == "all" else probs[..., layout.num_prefix :]
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
import warnings
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from probekit.attention import LayerAttention
from probekit.errors import ConfigError, UnsupportedArchitectureError
from probekit.metric.options import defaults as option_defaults
from probekit.metric.options import format_label, validate_options
from probekit.metric.state import REDUCTIONS, reduce_values
from probekit.tokens import TokenLayout

__all__ = ["Metric", "RUN_SETTINGS"]

#: the run settings a metric may declare in ``depends_on`` (each is a field of a run file)
RUN_SETTINGS = ("batch_size", "seed")


class Metric:
    """Base class of attention and hidden-state metrics.

    Class constants (read by the engine, ``probekit metrics`` and ``probekit.testing``):

    - ``name``: registry key; ``description``: one-line definition; ``citation``.
    - ``needs``: ``"attention"`` or ``"hidden"`` (output tokens of each block).
    - ``rowwise``: values are means over query rows of :meth:`row_values`.
    - ``uses_logits``: :meth:`row_sum` and :meth:`row_values` also receive the block's logits
      (``logits=``, where the tap has them); may be a property of the options (MAD asks only
      with ``renormalize=True``).
    - ``per_head``: values have a head axis after the batch axis.
    - ``is_map``: values have further axes (stored as arrays, not table rows).
    - ``requires``: what the metric needs of a layer's geometry, from
      :data:`probekit.geometry.REQUIREMENTS` (``"global"``, ``"square"``, ``"patch_queries"``,
      ``"cls"``); layers that lack one are refused with the reason.
    - ``requires_global_attention``: the older spelling; False drops ``"global"`` from ``requires``.
    - ``cross_layer``: state spans the layers of a batch (:meth:`on_batch_end` returns values).
    - ``unit``: unit of the values, for axis labels (see :meth:`value_unit`).
    - ``kernel_terms``: the per-query-row sums of the fused GPU kernel (:data:`probekit.engine.kernels.terms.TERMS`)
      :meth:`kernel_row_sum` reads; empty (default): the kernel does not serve this metric and
      it takes the blocked path.
    - ``display_name``: what axes and tables call the metric (default: ``name``); figures label
      an axis ``display_name (unit)`` and draw :meth:`reference_value` as a dashed line.
    - ``depends_on``: the run settings (:data:`RUN_SETTINGS`) the values depend on beyond the
      images, the model and the options, e.g. ``("batch_size",)`` for minibatch CKA. Their values
      join the part cache key, so a rerun with another value recomputes instead of serving the
      old part; a metric whose values do not depend on them leaves it empty (the default).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    needs: ClassVar[str] = "attention"
    rowwise: ClassVar[bool] = True
    uses_logits: ClassVar[bool] = False
    per_head: ClassVar[bool] = True
    is_map: ClassVar[bool] = False
    requires_global_attention: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ("global",)
    cross_layer: ClassVar[bool] = False
    unit: ClassVar[str] = ""
    kernel_terms: ClassVar[frozenset[str]] = frozenset()
    display_name: ClassVar[str] = ""  # set to ``name`` for classes that leave it out
    depends_on: ClassVar[tuple[str, ...]] = ()
    if TYPE_CHECKING:  # set in __init__ (add_state); annotated at run time they would be declared options
        values: dict[int, list[torch.Tensor]]
        _states: dict[str, tuple[Any, str]]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        unknown = [s for s in cls.depends_on if s not in RUN_SETTINGS]
        if isinstance(cls.depends_on, str) or unknown:
            raise TypeError(f"{cls.__name__}.depends_on must be a tuple of run settings from {RUN_SETTINGS}; "
                            f"got {cls.depends_on!r}.")
        if not cls.__dict__.get("display_name"):
            cls.display_name = cls.__dict__.get("name") or cls.display_name or cls.name

    _CONSTANTS = (
        "name", "needs", "rowwise", "per_head", "is_map", "requires_global_attention", "cross_layer",
        "uses_logits", "requires", "depends_on",
    )

    def __init__(self, **options: Any):
        """Validate ``options`` against the declared ones (see :mod:`probekit.metric.options`).

        Each option is also set as an attribute (``self.units``), read-only from then on.
        """
        opts = validate_options(type(self), options)
        object.__setattr__(self, "_options", opts)
        for key, value in opts.items():
            object.__setattr__(self, key, value)
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

    def default_options(self) -> dict[str, Any]:
        """The declared options' defaults."""
        return option_defaults(type(self))

    def reference_value(self, layout: TokenLayout) -> float | None:
        """The metric's value for uniform attention on ``layout``, where that is a telling reference
        (figures draw it as a dashed line), or None (the default).

        MAD: the "no locality" distance (116.49 px on 14x14 patches of 16 px, no prefix);
        entropy: ln N, its maximum.
        """
        return None

    def geometry_reference(self, layer: Any) -> float | None:
        """:meth:`reference_value` for a layer that is not one global attention (a
        :class:`~probekit.geometry.LayerGeometry`: windows, pooled keys, stages), or None (the default).
        The engine records it per layer (``Results.meta["geometry"]["references"]``); figures draw it."""
        return None

    def value_unit(self) -> str:
        """Unit of this instance's values (options may change it)."""
        return self.unit

    @property
    def label(self) -> str:
        """``name``, plus the options that differ from their defaults: ``mad[units=patch]``.

        Made once per instance (options are fixed at construction): the engine reads it about ten
        times per layer, and making it each time was a fifth of its Python per layer (issue 25).
        """
        label = self.__dict__.get("_label")
        if label is None:
            label = format_label(self.name, self.options(), self.default_options())
            object.__setattr__(self, "_label", label)
        return label

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"

    # -- the maths ------------------------------------------------------------------------------
    def check_model(self, adapter) -> None:
        """Refuse a model (an :class:`~probekit.adapter.Adapter`) this metric cannot describe.

        Layer by layer, :meth:`check_geometry` decides; this only refuses an adapter that is not
        global and gives no per-layer geometry to say which layers a metric could still read.
        """
        from probekit.adapter import Adapter

        no_geometry = type(adapter).geometry is Adapter.geometry
        if "global" in self.requirements() and not adapter.global_attention and no_geometry:
            raise UnsupportedArchitectureError(
                f"Metric {self.name!r} needs global attention (every query sees every patch); this "
                "model attends within local windows, where the metric has no meaning. Use it on "
                "global-attention ViTs only."
            )
        if self.needs == "hidden" and not adapter.provides_hidden:
            raise UnsupportedArchitectureError(
                f"Metric {self.name!r} needs each block's output tokens, which the {adapter.name!r} "
                "adapter cannot tap."
            )

    def requirements(self) -> tuple[str, ...]:
        """What this instance needs of every layer: ``requires`` (less ``"global"`` for a metric that set
        ``requires_global_attention = False``); options may add to it (CLS queries need ``"cls"``)."""
        if not self.requires_global_attention:
            return tuple(r for r in self.requires if r != "global")
        return tuple(self.requires)

    def check_geometry(self, geometry, layers=None) -> None:
        """Refuse (before any computation) a model whose layers lack what this metric needs.

        Args:
            geometry: a :class:`~probekit.geometry.ModelGeometry` for the input about to run.
            layers: the layer indices that will be probed (None: all).
        """
        from probekit.geometry import REQUIREMENTS, layout_lacks

        if self.needs != "attention":
            return
        for i in range(geometry.num_layers) if layers is None else sorted(layers):
            g = geometry.layer(i)
            for req in ("tokens", *self.requirements()):
                why = layout_lacks(g, req) if isinstance(g, TokenLayout) else g.lacks(req)
                if why:
                    raise UnsupportedArchitectureError(
                        f"Metric {self.label!r} needs {REQUIREMENTS[req]}, but layer {i} of this model {why}. "
                        "Probe other layers (layers=[...]) or use a metric whose requirements this layer "
                        "meets (`probekit metrics` lists them)."
                    )

    def geometry_queries(self) -> str:
        """Which queries :meth:`window_sum` sums over: ``"patches"`` (default) or ``"cls"``."""
        return "patches"

    def window_sum(self, probs: torch.Tensor, geometry, groups: torch.Tensor, **kw) -> torch.Tensor:
        """Sum of the per-query values over a grouped layer's queries (:mod:`probekit.engine.grouped`).

        Args:
            probs: float32 attention of ``n`` groups (windows), ``[n, H, Tq, Tk]``.
            geometry: the layer's :class:`~probekit.geometry.LayerGeometry`.
            groups: ``[n]`` index of each group within its image (into the geometry's tables).

        Returns:
            ``[n, H, ...]``; the engine adds an image's groups and divides by its query count.
        """
        raise NotImplementedError(f"{type(self).__name__} does not describe windowed or pooled layers")

    def query_rows(self, layout: TokenLayout) -> slice:
        """Query rows the value is averaged over: the patch tokens by default."""
        return slice(layout.num_prefix, layout.num_tokens)

    def row_values(self, probs: torch.Tensor, layout: TokenLayout, rows: slice) -> torch.Tensor:
        """Per-query-row values of a block of rows: ``[B, H, R, T]`` -> ``[B, H, R, ...]``."""
        raise NotImplementedError(f"{type(self).__name__} must define row_values or compute")

    def row_sum(self, probs: torch.Tensor, layout: TokenLayout, rows: slice,
                logits: torch.Tensor | None = None) -> torch.Tensor:
        """Sum of :meth:`row_values` over the rows of a block: ``[B, H, R, T]`` -> ``[B, H, ...]``.

        What the engine calls per block (it divides by the row count at the end). Override it
        when the sum has a faster form than the rows one by one (MAD: one matrix-vector product).
        A metric with ``uses_logits = True`` also gets ``logits=``: the block's float32 softmax
        inputs (same shape; None when the tap handed over probabilities), e.g. for entropy
        without a logarithm per element.
        """
        kw = {} if logits is None else {"logits": logits}
        return self.row_values(probs, layout, rows, **kw).sum(dim=2)

    def kernel_row_sum(self, terms, layout: TokenLayout, rows: slice) -> torch.Tensor | None:
        """Like :meth:`row_sum`, from the fused kernel's per-row sums (a
        :class:`probekit.engine.kernels.terms.RowTerms`).

        Returns None where these options are not served (the engine then takes the blocked path).
        """
        return None

    def compute(self, probs: torch.Tensor, layout: TokenLayout, logits: torch.Tensor | None = None) -> torch.Tensor:
        """One layer's per-image values from full probabilities ``[B, H, T, T]`` (and their logits).

        ``logits`` reach :meth:`row_values` of a metric with ``uses_logits`` (as the engine hands
        them over), e.g. for a renormalization over patch keys that cannot underflow
        (:mod:`probekit.metric.patch_keys`).
        """
        layout.check(probs.shape[-1], where="attention")
        rows = self.query_rows(layout)
        kw = {"logits": logits[:, :, rows].float()} if logits is not None and self.uses_logits else {}
        return self.row_values(probs[:, :, rows].float(), layout, rows, **kw).mean(dim=2)

    def compute_hidden(self, hidden: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """One layer's per-image values from its output tokens ``[B, T, D]`` (hidden metrics)."""
        raise NotImplementedError(f"{type(self).__name__} must define compute_hidden")

    # -- engine hooks (override for metrics that are not row-wise reductions) -------------------
    def on_batch_start(self, layout: TokenLayout) -> None:
        """Called before each batch's forward pass."""

    def on_attention(self, layer: int, attn: LayerAttention, layout: TokenLayout) -> torch.Tensor | None:
        """Per-image values of one layer, or None (cross-layer metrics keep state instead)."""
        return self.compute(attn.probs(), layout)

    def on_hidden(self, layer: int, hidden: torch.Tensor, layout: TokenLayout) -> torch.Tensor | None:
        return self.compute_hidden(hidden, layout)

    def on_batch_end(self) -> dict[int, torch.Tensor]:
        """Cross-layer metrics: per-image values keyed by layer (or -1 for the whole model)."""
        return {}

    # -- declared, mergeable state ------------------------------------------------------------------
    def add_state(self, name: str, default: Any, reduce: str = "sum") -> None:
        """Declare one piece of state: its value after :meth:`reset` and how two partial states combine.

        ``reduce`` is one of ``sum``, ``cat``, ``max``, ``min``, ``same`` (see
        :mod:`probekit.metric.state`); a ``dict`` default is keyed state (e.g. per layer), reduced
        per key. The state is an attribute (``self.<name>``); reset, merge, state_dict and
        load_state_dict handle it, so a metric writes none of them.
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

        Both paths refuse another metric or other options (:class:`ConfigError`): merging
        ``mad[units=patch]`` into ``mad`` would average patches with pixels.
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

    def load_state_dict(self, state: dict) -> None:
        """Replace all state with ``state`` (a :meth:`state_dict` of the same metric and options)."""
        self._check_state(state)
        self.reset()
        self.merge(state)

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
            theirs = format_label(state["name"], opts, self.default_options() if state["name"] == self.name else {})
            raise ConfigError(
                f"Cannot merge the state of {theirs} into {self.label}: different metric or options. Merge only "
                "states of the same metric with the same options."
            )
        if set(state["state"]) != set(self._states):
            raise ConfigError(f"Cannot merge into {self.label}: state {sorted(state['state'])} "
                              f"!= declared {sorted(self._states)}.")
