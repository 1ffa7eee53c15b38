"""Run files: the YAML that says which models, images and metrics a comparison uses.

A run file is data, validated by pydantic before any model is loaded (as fastapi-cli
validates its config): unknown fields are refused, and every error names the line of the
file and the field, one bullet each; a key given twice in one mapping is refused with both lines
(YAML would keep the last silently). Paths expand ``~`` and environment variables. :meth:`RunConfig.resolve`
puts command-line flags over file values, and :func:`check_run` proves the run can start (models
resolvable, their names in their library's list by ``Adapter.check_spec``, metrics known with valid
options, images present) so nothing fails an hour in for a typo.

Example run file::

    name: quickstart
    models:
      - model: dino-s16                  # an alias from `probekit models`, or a spec
        training: self-supervised
      - model: timm:vit_small_patch16_224
        label: random init
        options: {pretrained: false}
    images: sample                       # or a folder, a list, or {path: ..., count: 50, seed: 0}
    metrics: [mad, {name: mad, options: {units: patch}}]
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from probekit._io.safe_yaml import load_yaml
from probekit.errors import ConfigError, ImageError, MissingDependencyError, ProbekitError

if TYPE_CHECKING:
    from probekit.adapter import Adapter
    from probekit.inputs.images import ImageSet

__all__ = ["ModelEntry", "ImagesEntry", "MetricEntry", "ReportEntry", "Resources", "RunConfig", "load_run", "as_config",
           "check_names", "check_run", "CheckedRun", "ModelSpec", "expand_path"]

Figure = Literal["depth", "overlay", "heatmap", "summary", "maps", "labels", "accuracy"]
_FIGURES: tuple[Figure, ...] = ("depth", "overlay", "heatmap", "summary", "maps", "labels", "accuracy")
_UNSET = re.compile(r"\$(\w+|\{[^}]*\})")  # what os.path.expandvars leaves: a variable that is not set


def expand_path(value: str) -> str:
    """``value`` with ``~`` and environment variables (``$TMPDIR``, ``${HOME}``) expanded, as a
    shell would, so ``out: $TMPDIR/run`` never makes a folder named ``$TMPDIR``.

    Raises:
        ValueError: it names a variable that is not set (pydantic reports it with the line).

    >>> expand_path("$HOME/run") == expand_path("${HOME}/run") == os.path.expanduser("~/run")
    True
    """
    out = os.path.expanduser(os.path.expandvars(value))
    unset = _UNSET.search(out)
    if unset:
        raise ValueError(f"{value!r} uses the environment variable {unset.group(0)}, which is not set; "
                         "set it, or write the path out")
    return out


def _expanded(v: Any) -> Any:
    return expand_path(v) if isinstance(v, str) else v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelEntry(_Strict):
    """One model of a run: an alias or spec, how results name it, and backend options."""

    model: str = Field(validation_alias=AliasChoices("model", "spec", "alias"), min_length=1)
    label: str | None = None
    training: str | None = Field(default=None, validation_alias=AliasChoices("training", "group"))
    options: dict[str, Any] = Field(default_factory=dict)
    #: grouping columns of your own (``{lab: fair, size: small}``), for ``report.group_by``
    tags: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v: Any) -> Any:
        return {"model": v} if isinstance(v, str) else v

    @field_validator("model")
    @classmethod
    def _spec_vars(cls, v: str) -> str:  # onnx:$MODELS/vit.onnx, hf:${DATA}/my-vit
        return expand_path(v) if "$" in v else v

    @field_validator("options")
    @classmethod
    def _checkpoint_vars(cls, v: dict[str, Any]) -> dict[str, Any]:
        return {**v, "checkpoint": _expanded(v["checkpoint"])} if "checkpoint" in v else v

    @property
    def name(self) -> str:
        """How results and figures name this model."""
        return self.label or self.model


class ImagesEntry(_Strict):
    """The image set: ``"sample"``, folders or files, or a labelled source (:mod:`probekit.inputs.sources`:
    class folders, a manifest, WebDataset shards, a ``datasets`` dataset, scikit-learn's digits), optionally
    a seeded random subset, stratified by label."""

    path: list[str] = Field(validation_alias=AliasChoices("path", "paths", "shards"), min_length=1)
    kind: Literal["auto", "files", "classes", "manifest", "webdataset", "hf", "digits"] = "auto"
    count: int | None = Field(default=None, gt=0)
    seed: int = 0
    stratify: bool = False
    path_column: str = "path"  # manifest
    label_column: str | None = None  # manifest (default: "label" if present), hf
    group_column: str | None = None  # manifest
    image_column: str = "image"  # hf
    split: str | None = None  # hf save_to_disk DatasetDict
    size: int = Field(default=224, ge=8)  # digits: side of the upscaled images, px
    resample: Literal["nearest", "bilinear"] = "nearest"  # digits: how they are upscaled

    @model_validator(mode="before")
    @classmethod
    def _from_short(cls, v: Any) -> Any:
        if isinstance(v, (str, list)):
            return {"path": v}
        if isinstance(v, dict) and v.get("kind") == "digits" and not {"path", "paths", "shards"} & set(v):
            return {**v, "path": "digits"}  # scikit-learn's digits are built in: no path to give
        return v

    @field_validator("path", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("path")
    @classmethod
    def _path_vars(cls, v: list[str]) -> list[str]:
        return [expand_path(p) for p in v]


class Resources(_Strict):
    """What the Ray engine asks of the cluster (``resources:`` in a run file). The local engine reads
    ``shard_size`` alone: a larger set is probed and cached shard by shard (probekit.runs.shards)."""

    gpus: float | None = Field(default=None, ge=0)  # per model replica; None: 1 when the cluster has GPUs
    cpus: float | None = Field(default=None, ge=0)  # per model replica; None: a share (at most 1) that fits every node
    decode_cpus: float | None = Field(default=None, gt=0)  # per decoding task; None: as cpus
    replicas: int | None = Field(default=None, gt=0)  # per model; None: one per GPU (GPUs / models), else 1
    # images per cached shard, in whole batches; None: 16 batches on Ray, 2048 images on the local engine
    shard_size: int | None = Field(default=None, gt=0)
    # seconds without a finished chunk before the run fails (resumable); None: 300 s, or 10x the
    # longest wait between chunks seen when longer (probekit.runs.engines.stall)
    stall_s: float | None = Field(default=None, gt=0)


class MetricEntry(_Strict):
    """One metric by registered name, with its constructor options."""

    name: str = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v


class ReportEntry(_Strict):
    """The HTML report: which images the attention explorer shows, its byte budget, the contrast grouping
    and inference scope."""

    #: how many images (the first ones) or which image names the explorer stores
    showcase: int | list[str] = Field(default=3)
    #: uint8 attention rows stored for the explorer per model, in MB: every query patch while they fit (16 MB:
    #: ViT-S and ViT-B at 224 px on 3 images), else a sub-grid; per model so that adding a model never
    #: invalidates the others' cached arrays
    explorer_mb: float = Field(default=16.0, gt=0, le=64)
    #: the model field that groups models for the statistics: ``training`` or one of the models' ``tags``
    group_by: str = "training"
    #: what the contrasts' CI, p and effect size generalise over: ``images`` (these models; images as the
    #: sample) or ``models`` (each group's models as a sample of such models; needs 3 models or more)
    inference: Literal["images", "models"] = "images"

    @field_validator("showcase")
    @classmethod
    def _showcase(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 0:
            raise ValueError("showcase must be a count >= 0 or a list of image names")
        return v


class RunConfig(_Strict):
    """A validated run file. Fields left out take these defaults."""

    name: str = "run"
    models: list[ModelEntry] = Field(min_length=1)
    images: ImagesEntry = Field(default_factory=lambda: ImagesEntry(path=["sample"]))
    metrics: list[MetricEntry] = Field(default_factory=lambda: [MetricEntry(name="mad")], min_length=1)
    image_size: int | tuple[int, int] | None = None
    batch_size: int = Field(default=16, gt=0)
    device: str | None = None
    dtype: Literal["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"] = "float32"
    out: str | None = None
    seed: int = 0
    workers: int = Field(default=0, ge=0)
    engine: Literal["local", "ray"] = "local"
    address: str | None = None  # the Ray cluster: auto, ray://host:port; None: a local one
    resources: Resources = Field(default_factory=Resources)
    strict: bool = False
    figures: list[Figure] = Field(default_factory=lambda: list(_FIGURES))
    report: ReportEntry = Field(default_factory=ReportEntry)

    @field_validator("out")
    @classmethod
    def _out_vars(cls, v: str | None) -> str | None:
        return _expanded(v)

    @field_validator("metrics", mode="before")
    @classmethod
    def _metrics_mapping(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [v]
        if isinstance(v, dict):  # {mad: {units: px}, entropy: null}
            return [{"name": k, "options": o or {}} for k, o in v.items()]
        return v

    # set by load_run: where the file is and its parsed node tree, for line numbers
    _source: str | None = None
    _nodes: Any = None

    def line_of(self, *loc: Any) -> int | None:
        """The 1-based line of the run file that holds field ``loc`` (None if not from a file)."""
        return _line_of(self._nodes, loc) if self._nodes is not None else None

    def where(self, *loc: Any) -> str:
        """``"run.yaml line 4, models[0].model"``: how errors point at a field."""
        line = self.line_of(*loc)
        src = Path(self._source).name if self._source else "run"
        at = f"{src} line {line}" if line else src
        return f"{at}, {_dotted(loc)}" if loc else at

    def resolve(self, **flags: Any) -> RunConfig:
        """A copy with command-line ``flags`` over file values (flags left None are ignored).

        Raises:
            ConfigError: a flag value that the run file could not hold either.
        """
        given = {k: v for k, v in flags.items() if v is not None}
        unknown = set(given) - set(type(self).model_fields)
        if unknown:
            raise ConfigError(f"Unknown run setting(s): {', '.join(sorted(unknown))}.")
        data = self.model_dump(by_alias=False)
        data.update(given)
        try:
            out = type(self).model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_format_errors(exc, None, "command-line flags")) from None
        out._source, out._nodes = self._source, self._nodes
        return out

    def model_options(self, entry: ModelEntry) -> dict[str, Any]:
        """The options a model is loaded with: run-wide ``image_size`` under the entry's own."""
        opts = dict(entry.options)
        if self.image_size is not None and "image_size" not in opts:
            opts["image_size"] = self.image_size
        return opts


# -- reading files ---------------------------------------------------------------------------
def as_config(config_or_path: Any) -> RunConfig:
    """A :class:`RunConfig` from itself, a dict of run settings or a run file's path.

    Raises:
        ConfigError: bad settings (one bullet per field) or a bad file (see :func:`load_run`).
    """
    if isinstance(config_or_path, RunConfig):
        return config_or_path
    if isinstance(config_or_path, dict):
        try:
            return RunConfig.model_validate(config_or_path)
        except ValidationError as exc:
            raise ConfigError(_format_errors(exc, None, "run settings")) from None
    return load_run(config_or_path)


def load_run(path: str | Path) -> RunConfig:
    """Read and validate a YAML run file.

    Args:
        path: the run file, or the name of one shipped with probekit (``"quickstart"``).

    Returns:
        The validated :class:`RunConfig`; relative image paths and ``out`` are taken relative
        to the current directory, as on the command line.

    Raises:
        ConfigError: the file is missing, is not YAML, gives a key twice in one mapping (any
            depth; both lines named), or has bad fields (one bullet per field, each with its
            line number).

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "r.yaml"
    >>> _ = p.write_text("models: [vit-b16]\\nmetrics: [mad]\\nbatch_sise: 4\\n")
    >>> try: load_run(p)
    ... except ConfigError as e: print(str(e).splitlines()[1])
      - r.yaml line 3, batch_sise: Extra inputs are not permitted (got 4)
    """
    path = Path(path)
    if not path.is_file():
        path = _bundled(path)
    text = path.read_text()
    try:
        nodes = yaml.compose(text)
        data = load_yaml(text, path.name)  # safe, and a key given twice is refused with both lines
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path.name} is not valid YAML{where}: {getattr(exc, 'problem', exc)}.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name} must be a mapping with at least `models:`; got {type(data).__name__}.")
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, nodes, path.name)) from None
    cfg._source, cfg._nodes = str(path), nodes
    return cfg


def _bundled(path: Path) -> Path:
    """A run file shipped with probekit (``quickstart`` -> configs/quickstart.yaml), for pip users."""
    from importlib import resources

    root = resources.files("probekit.configs")
    names = sorted(p.name for p in root.iterdir() if p.name.endswith(".yaml") and p.name != "models.yaml")
    for name in (path.name, f"{path.name}.yaml"):
        if len(path.parts) == 1 and name in names:
            return Path(str(root.joinpath(name)))
    shipped = ", ".join(n.removesuffix(".yaml") for n in names)
    raise ConfigError(f"No run file at {path}. Pass the path of a YAML run file, or one shipped with "
                      f"probekit: {shipped}.")


def _dotted(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line_of(node: Any, loc) -> int | None:
    """Follow ``loc`` down the YAML node tree; the line of the deepest node reached."""
    line = None
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            pairs = node.value
            if isinstance(part, int):  # a mapping read as a list (metrics: {mad: ...})
                nxt = pairs[part][0] if part < len(pairs) else None
            else:
                hit = [(k, v) for k, v in pairs if getattr(k, "value", None) == part]
                # a key of its own (an extra field) points at the key; a value at the value
                nxt = hit[0][1] if hit else None
                if hit and not isinstance(hit[0][1], (yaml.MappingNode, yaml.SequenceNode)):
                    nxt = hit[0][0]
            node = nxt
        elif isinstance(node, yaml.SequenceNode):
            node = node.value[part] if isinstance(part, int) and part < len(node.value) else None
        else:
            node = None
    if node is not None:
        line = node.start_mark.line + 1
    return line


def _clean_loc(loc) -> tuple:
    """Drop pydantic's internal steps (union members, validator tags) from an error location."""
    return tuple(p for p in loc if isinstance(p, int) or not (p[:1].isupper() or "[" in p or p.startswith("function")))


def _format_errors(exc: ValidationError, nodes: Any, source: str) -> str:
    errors = exc.errors(include_url=False)
    lines = [f"{source} has {len(errors)} problem{'s' * (len(errors) != 1)}:"]
    for err in errors:
        loc = _clean_loc(err["loc"])
        line = _line_of(nodes, loc) if nodes is not None else None
        at = f"{source} line {line}" if line else source
        got = err.get("input")
        shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
        lines.append(f"  - {at}, {_dotted(loc) or '(top level)'}: {err['msg']}{shown}")
    return "\n".join(lines)


# -- checking a run before any long work --------------------------------------------------------
def _spec_problem(cls: type[Adapter], spec: str, opts: dict) -> str | None:
    """Why ``cls`` (an adapter) could not build ``spec``, by its :meth:`~probekit.Adapter.check_spec`; or None."""
    from probekit.models import missing_dependency

    try:
        cls.check_spec(spec.partition(":")[2], **opts)
    except ProbekitError as exc:
        return str(exc)
    except ModuleNotFoundError as exc:  # the backend's library is not installed
        return str(missing_dependency(cls, exc))
    except Exception as exc:  # a plugin's own check failing is its bug: say whose, run nothing
        return f"the {cls.__name__}.check_spec of this backend failed ({type(exc).__name__}: {exc})"
    return None


class ModelSpec(NamedTuple):
    """A model entry resolved: its spec, backend options (typed) and the alias's metadata."""

    spec: str
    options: dict[str, Any]
    meta: dict[str, Any]


@dataclass
class CheckedRun:
    """A run that can start: resolved specs, metric instances and the image set."""

    config: RunConfig
    specs: list[ModelSpec]  # per model entry
    metrics: list  # Metric instances, in run-file order
    images: ImageSet


def _cannot_start(problems: list[str]) -> ConfigError:
    n = len(problems)
    return ConfigError(f"The run cannot start ({n} problem{'s' * (n != 1)}):\n" +
                       "\n".join(f"  - {p}" for p in problems))


def _missing_image_paths(entry: ImagesEntry) -> list[str]:
    """What the image set would say of each plain file or folder that is not there (``sample``, shard
    patterns, manifests and datasets are left to :func:`check_run`, which names them its own way)."""
    if entry.kind not in ("auto", "files"):
        return []
    out = []
    for item in entry.path:
        path = Path(item).expanduser()
        if item == "sample" or any(c in item for c in "{*?[") or path.exists():
            continue
        if entry.kind == "auto" and path.suffix.lower() in (".csv", ".tsv", ".tar", ".parquet"):
            continue  # a manifest, shards or a dataset's parquet, by its name
        shown = os.fsencode(str(path)).decode("utf-8", "backslashreplace")  # as inputs.images.display_name
        out.append(f"No such file or folder: {shown}. Check the path, or use 'sample'.")
    return out


def check_names(cfg: RunConfig) -> None:
    """The part of :func:`check_run` that needs no model library: every model an alias or a spec of an
    installed backend, every metric registered, every plain image file or folder there. It reads entry
    points and folders only (no plugin, torch or model library is imported), so a typo fails in well
    under a second; the command line runs it first, then :func:`check_run` checks the rest.

    Raises:
        ConfigError: one bullet per problem, worded as :func:`check_run` words it.
    """
    from probekit.model_aliases import backend_problem, resolve
    from probekit.registry import metrics as metric_registry

    problems = []
    for i, entry in enumerate(cfg.models):
        try:
            spec = resolve(entry.model)[0]
        except ProbekitError as exc:
            problems.append(f"{cfg.where('models', i, 'model')}: {exc}")
            continue
        bad = backend_problem(spec.partition(":")[0])
        if bad is not None:
            problems.append(f"{cfg.where('models', i, 'model')}: {bad}")
    for i, metric in enumerate(cfg.metrics):
        if metric.name not in metric_registry:
            problems.append(f"{cfg.where('metrics', i)}: {metric_registry.unknown(metric.name)}")
    problems += [f"{cfg.where('images')}: {msg}" for msg in _missing_image_paths(cfg.images)]
    if problems:
        raise _cannot_start(problems)


def check_run(cfg: RunConfig) -> CheckedRun:
    """Prove the run can start: every model resolvable, metric known, image present.

    Raises:
        ConfigError: one bullet per problem, each naming the line and field.
    """
    from probekit.adapter_options import options_message, options_problems
    from probekit.engine.probe import build_metrics
    from probekit.models import adapter_class, device_problem, resolve
    from probekit.registry import metrics as metric_registry

    problems, specs, mets = [], [], []
    labels = [m.name for m in cfg.models]
    for i, entry in enumerate(cfg.models):
        if labels.count(entry.name) > 1:
            problems.append(f"{cfg.where('models', i, 'model')}: the name {entry.name!r} is used twice; "
                            "give one of them a `label:`.")
        try:
            spec, opts, meta = resolve(entry.model, **cfg.model_options(entry))
            cls = adapter_class(spec.partition(":")[0])
        except ProbekitError as exc:
            problems.append(f"{cfg.where('models', i, 'model')}: {exc}")
            continue
        opts, bad = options_problems(cls, opts)  # typed before any model loads
        if bad:
            problems.append(f"{cfg.where('models', i, 'options')}: {options_message(cls, bad, spec)}")
        else:
            problem = _spec_problem(cls, spec, opts)  # the name against the library's list, no model built
            if problem:
                problems.append(f"{cfg.where('models', i, 'model')}: {problem}")
        specs.append(ModelSpec(spec, opts, meta))
    for i, metric in enumerate(cfg.metrics):
        try:
            mets.append(metric_registry.get(metric.name)(**metric.options))
        except (ProbekitError, TypeError) as exc:
            msg = str(exc)
            if isinstance(exc, TypeError):
                msg = f"bad options for metric {metric.name!r}: {exc}"
            problems.append(f"{cfg.where('metrics', i)}: {msg}")
    if not problems:
        try:
            build_metrics(mets)  # refuses the same metric twice
        except ConfigError as exc:
            problems.append(f"{cfg.where('metrics')}: {exc}")
    if cfg.device is not None:
        problem = device_problem(cfg.device)
        if problem:
            problems.append(f"{cfg.where('device')}: {problem}")
    images = None
    try:
        from probekit.inputs.sources import from_entry

        images = from_entry(cfg.images, strict=cfg.strict)
    except (ImageError, ConfigError, MissingDependencyError) as exc:
        problems.append(f"{cfg.where('images')}: {exc}")
    labelled = [m for m in mets if m.needs_labels]
    if images is not None and images.labels is None and labelled:  # representation probes
        from probekit.engine.sink import unlabelled

        problems.append(f"{cfg.where('images')}: {unlabelled(labelled)}")
    elif images is not None and images.labels is not None:
        for m in labelled:
            try:
                m.check_labels([str(v) for v in images.labels])
            except ConfigError as exc:
                problems.append(f"{cfg.where('metrics')}: {exc}")
    if problems:
        raise _cannot_start(problems)
    assert images is not None  # (images that cannot be listed are one of the problems)
    return CheckedRun(cfg, specs, mets, images)
