"""The ``probekit`` command: list models and metrics, inspect a model, run and plot comparisons.

Each command is a small function over the Python API. Data goes to stdout, messages and
progress to stderr. An expected failure (any :class:`~probekit.errors.ProbekitError`)
prints one short red line, plus one bullet per bad field, and exits with code 1; a
traceback is shown only with ``PROBEKIT_DEBUG=1``.
"""

from __future__ import annotations

import json
import os
import sys
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from probekit.errors import (
    ConfigError,
    ImageError,
    PluginLoadError,
    ProbekitError,
    UnknownNameError,
    UnsupportedArchitectureError,
    WeightsUnavailableError,
)

__all__ = ["app", "main"]


class _Consoles:
    """Data to stdout, messages to stderr; tables are never cut when stdout is a pipe or file."""

    @property
    def out(self) -> Console:
        return Console(soft_wrap=True, width=None if sys.stdout.isatty() else 240)

    @property
    def err(self) -> Console:
        return Console(stderr=True, soft_wrap=True)


_consoles = _Consoles()

app = typer.Typer(
    name="probekit",
    help="Measure what the attention heads of Vision Transformers do, the same way across libraries.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        from probekit import __version__

        _consoles.out.print(f"probekit {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print probekit's version and exit.")] = False,
) -> None:
    """Measure what the attention heads of Vision Transformers do, the same way across libraries."""


def _weights_hint(exc: WeightsUnavailableError) -> str:
    if not exc.random_init:  # e.g. an ONNX graph, which has no random-init control
        return ""
    return ("Connect once to download the weights, or pass --no-pretrained for a random-init control; "
            "`probekit models --offline` lists the aliases whose weights are on this machine.")


def _plugin_hint(exc: PluginLoadError) -> str:
    command = "models" if exc.kind == "adapter" else "metrics"
    return f"Run `probekit {command}` to see which {exc.kind} plugins load."


# One table from error type to the hint that follows its message (most specific first); a hint
# is a sentence, or a function of the error when it depends on it.
CLI_ERROR_HINTS: list[tuple[type[BaseException], Any]] = [
    (UnknownNameError, "List what exists with `probekit models` or `probekit metrics`."),
    (WeightsUnavailableError, _weights_hint),
    (PluginLoadError, _plugin_hint),
    (UnsupportedArchitectureError, ""),
    (ImageError, ""),
    (ConfigError, ""),
    (ProbekitError, ""),
]


def _fail(exc: BaseException, code: int = 1) -> None:
    """Print ``exc`` as one red line (bullets below it) with its hint, then exit."""
    first, *rest = str(exc).splitlines() or [type(exc).__name__]
    hint = next((h for t, h in CLI_ERROR_HINTS if isinstance(exc, t)), "")
    hint = hint(exc) if callable(hint) else hint
    if hint and hint in str(exc):
        hint = ""
    _consoles.err.print(f"[bold red]Error:[/] [red]{escape(first)}[/]", highlight=False)
    for line in rest:
        _consoles.err.print(line, highlight=False, markup=False)
    if hint:
        _consoles.err.print(f"[dim]{hint}[/]", highlight=False)
    _consoles.err.print("[dim]Set PROBEKIT_DEBUG=1 for a traceback.[/]", highlight=False)
    raise typer.Exit(code=code)


def _handled(fn):
    """Expected errors become one message and exit code 1 (tracebacks with PROBEKIT_DEBUG=1)."""

    @wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ProbekitError as exc:
            if os.environ.get("PROBEKIT_DEBUG"):
                raise
            _fail(exc)

    return run


def _parse_options(pairs: list[str] | None, what: str) -> dict[str, Any]:
    """``["k=v", ...]`` -> dict; values read as YAML (``false``, ``8``, ``[224, 160]``)."""
    import yaml

    opts = {}
    for pair in pairs or []:
        key, sep, val = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE.", param_hint=what)
        try:
            opts[key.strip()] = yaml.safe_load(val)
        except yaml.YAMLError:
            opts[key.strip()] = val
    return opts


FormatOpt = Annotated[
    str, typer.Option("--format", "-f", help="Output format: [bold]human[/] (a table) or [bold]json[/].",
                      case_sensitive=False)
]


def _check_format(fmt: str) -> str:
    fmt = fmt.lower()
    if fmt not in ("human", "json"):
        raise typer.BadParameter(f"{fmt!r} is not one of human, json.", param_hint="--format")
    return fmt


# -- models, metrics, inspect --------------------------------------------------------------------
@app.command("models", epilog="Examples:\n\n  probekit models\n\n  probekit models --offline\n\n"
             "  probekit models --check --format json")
@_handled
def models_cmd(
    format: FormatOpt = "human",
    filter: Annotated[str | None, typer.Option(help="Only aliases matching this glob, e.g. 'dino*'.")] = None,
    offline: Annotated[bool, typer.Option("--offline", help="Only aliases that load without a network "
                                          "(weights cached, bundled or local, or random init).")] = False,
    check: Annotated[bool, typer.Option("--check", help="Load each backend's plugin and say whether it works "
                                        "(imports the model libraries: slower).")] = False,
):
    """List the model aliases (spec, training kind, family, patch size, whether their weights are on this
    machine) and every backend, plugins included.

    The weights column looks in the Hugging Face cache (HF_HOME), torch hub's (TORCH_HOME) and installed
    packages; nothing is downloaded. Any spec works too: BACKEND:NAME, e.g. hf:<repo id>,
    timm:<model name>, open_clip:<arch>/<tag>, onnx:<path>.
    """
    import fnmatch

    from probekit.model_aliases import OFFLINE_STATES, WEIGHTS_STATES, aliases, backend_descriptions, weights_status
    from probekit.registry import adapters

    fmt = _check_format(format)
    table = aliases()
    rows = [
        {"alias": a, "spec": e.get("spec"), "training": e.get("training"), "family": e.get("family"),
         "patch": e.get("patch_size"), "weights": weights_status(e), "source": e.get("source")}
        for a, e in table.items() if not filter or fnmatch.fnmatch(a, filter)
    ]
    if offline:
        rows = [r for r in rows if r["weights"] in OFFLINE_STATES]
    described = backend_descriptions()
    backends = []
    for rec in adapters.records():  # found from entry points; nothing is imported unless --check
        row = {"backend": rec.name, "loads": described.get(rec.name, f"{rec.name}:<name>"), "source": rec.dist,
               "aliases": sum(e["spec"].partition(":")[0] == rec.name for e in table.values())}
        if check:
            try:
                adapters.get(rec.name)
                row["status"] = "ok"
            except ProbekitError as exc:
                row["status"] = str(exc)
        backends.append(row)
    if fmt == "json":
        _consoles.out.print_json(json.dumps({"aliases": rows, "backends": backends}))
        return
    keys = ("alias", "spec", "training", "family", "patch", "weights", "source")
    out = Table(*keys, box=None, header_style="bold", title="aliases")
    for r in rows:
        cells = [escape(str(r[k] if r[k] is not None else "")) for k in keys]
        if r["weights"] in OFFLINE_STATES:
            cells[keys.index("weights")] = f"[green]{cells[keys.index('weights')]}[/]"
        out.add_row(*cells)
    _consoles.out.print(out)
    shown = [w for w in WEIGHTS_STATES if any(r["weights"] == w for r in rows)]  # what each answer shown means
    _consoles.err.print("[dim]weights: " + "; ".join(f"{escape(w)}: {escape(WEIGHTS_STATES[w])}" for w in shown)
                        + "[/]", highlight=False)
    columns = ("backend", "loads", "source", "aliases") + (("status",) if check else ())
    out = Table(*columns, box=None, header_style="bold", title="backends")
    for r in backends:
        cells = [escape(str(r[k])) for k in columns]
        if check and r["status"] != "ok":
            cells[-1] = f"[red]{cells[-1]}[/]"
        out.add_row(*cells)
    _consoles.out.print(out)


@app.command("metrics", epilog="Examples:\n\n  probekit metrics\n\n  probekit metrics --format json")
@_handled
def metrics_cmd(format: FormatOpt = "human"):
    """List the registered metrics, built-in and third-party, with a one-line description."""
    from probekit.registry import metrics

    fmt = _check_format(format)
    from probekit._installed import class_constants

    rows: list[dict[str, Any]] = []
    for rec in metrics.records():
        try:
            # read from the class's source when it can be: importing a metric imports torch (seconds)
            ep = rec.entry_point
            cls = (ep is not None and rec.obj is None
                   and class_constants(ep.value, ("description", "unit"), "Metric", {"unit": ""})) \
                or metrics.get(rec.name)
            get = cls.get if isinstance(cls, dict) else lambda k, cls=cls: getattr(cls, k)
            unit = get("unit")  # a property where options decide it: no one unit to list (as read from source)
            rows.append({"name": rec.name, "description": get("description"),
                         "unit": unit if isinstance(unit, str) else "", "source": rec.dist})
        except ProbekitError as exc:
            rows.append({"name": rec.name, "description": None, "error": str(exc),
                         "source": rec.dist})
    if fmt == "json":
        _consoles.out.print_json(json.dumps(rows))
        return
    table = Table("metric", "description", box=None, header_style="bold")
    for r in rows:
        desc = escape(r["description"] or "") if "error" not in r else f"[red](failed to load: {escape(r['error'])})[/]"
        table.add_row(r["name"], desc or "")
    _consoles.out.print(table)


@app.command("inspect", epilog="Examples:\n\n  probekit inspect dino-s16\n\n"
             "  probekit inspect timm:vit_small_patch16_224 --no-pretrained --image-size 384")
@_handled
def inspect_cmd(
    model: Annotated[str, typer.Argument(
        metavar="MODEL", help="An alias from `probekit models`, or a spec such as timm:vit_small_patch16_224.",
    )],
    pretrained: Annotated[bool, typer.Option(
        "--pretrained/--no-pretrained", help="Load pretrained weights, or build the architecture at random init.",
    )] = True,
    image_size: Annotated[int | None, typer.Option(
        help="Input size in pixels (default: the model's native size).",
    )] = None,
    option: Annotated[list[str] | None, typer.Option(
        "--option", "-o", help="A backend option KEY=VALUE; repeat for several.",
    )] = None,
    format: FormatOpt = "human",
):
    """Show a model's layers, heads, prefix tokens, patch grid, patch size and parameter count."""
    fmt = _check_format(format)
    opts = _parse_options(option, "--option")
    _check_model_name(model)  # a typo fails here, before torch and the model library load
    from probekit import models

    if not pretrained:
        opts["pretrained"] = False
    if image_size is not None:
        opts["image_size"] = image_size
    pm = models.load(model, **opts)
    info = pm.describe(pm.example_input(image_size=(image_size, image_size) if image_size else None))
    if fmt == "json":
        _consoles.out.print_json(json.dumps(info, default=str))
        return
    table = Table(box=None, show_header=False)
    for k, v in info.items():
        table.add_row(f"[bold]{k}[/]", escape(", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)))
    _consoles.out.print(table)


def _check_model_name(model: str) -> None:
    """An alias or a spec of an installed backend, read from the alias files and entry points only."""
    from probekit.model_aliases import backend_problem, resolve

    problem = backend_problem(resolve(model)[0].partition(":")[0])
    if problem is not None:
        raise problem


# -- run, compare, plot ------------------------------------------------------------------------
class _Progress:
    """A rich progress bar on stderr: one task per model (a Reporter for probekit.runs.compare)."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=_consoles.err, transient=False)
        self.tasks: dict[str, Any] = {}

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def model_started(self, label, images, cached):
        desc = f"{escape(label)} [dim](cached)[/]" if cached else escape(label)
        self.tasks[label] = self.bar.add_task(desc, total=images, completed=images if cached else 0)

    def images_done(self, label, done, total):
        self.bar.update(self.tasks[label], completed=done, total=total)

    def model_finished(self, label, seconds, cached):
        self.bar.stop_task(self.tasks[label])

    def model_failed(self, label, message):
        self.bar.update(self.tasks[label], description=f"[red]{escape(label)} failed[/]")
        self.bar.stop_task(self.tasks[label])

    def shard_done(self, label, shard):
        """(images_done already moved the bar)"""


def _run_comparison(cfg_or_path: Any, out_dir: str | None, figures: bool, report: bool = True, **flags) -> None:
    from probekit.api import compare
    from probekit.runs.interrupt import Terminated

    try:
        with _Progress() as bar:
            cmp = compare(cfg_or_path, out=out_dir, reporter=bar, figures=figures, report=report, **flags)
    except KeyboardInterrupt as exc:  # Ctrl-C: 130; SIGTERM (SLURM, Kubernetes): 143, as shells report them
        what = "Terminated (SIGTERM)." if isinstance(exc, Terminated) else "Interrupted."
        _consoles.err.print(f"[yellow]{what}[/] Finished parts are kept; run the same command again to resume.",
                            highlight=False)
        raise typer.Exit(code=exc.exit_code if isinstance(exc, Terminated) else 130) from None
    if cmp.status == "failed":  # every model failed: the run kept nothing
        _consoles.err.print(f"[bold red]Error:[/] [red]Every model failed, so the run kept nothing in "
                            f"{escape(str(cmp.run_dir))} (a new folder is removed, an existing one left as it "
                            "was):[/]", highlight=False)
        for f in cmp.failures:
            _consoles.err.print(f"  - {f.model} ({f.stage}): {f.error}: {f.message}", markup=False, highlight=False)
        raise typer.Exit(code=1)
    res = cmp.results
    if len(res):
        for metric in res.metrics:
            means = res.layer_means(metric)
            table = Table("model", *[str(c) for c in means.columns],
                          title=escape(f"{metric}: mean over heads and images per layer"),
                          box=None, header_style="bold")
            for model, row in means.iterrows():
                table.add_row(escape(str(model)), *[f"{v:.4g}" for v in row])
            _consoles.out.print(table)
    _print_contrasts(cmp.contrasts)
    extra = ", contrasts.csv, report.html" if cmp.report is not None else ""
    _consoles.err.print(f"Wrote {cmp.run_dir}/ (results.parquet, summary.csv, run.json{extra}, "
                        f"{len(cmp.figures)} figure files).")
    if cmp.report is not None:
        _consoles.err.print(f"Open {cmp.report} in a browser (one self-contained file).", highlight=False)
    if cmp.cached:
        _consoles.err.print(f"[dim]Served from cache: {escape(', '.join(cmp.cached))}.[/]")
    _print_notes(cmp.notes)
    _consoles.out.print(str(cmp.run_dir))
    _report_nonfinite(cmp.nonfinite)
    if cmp.failures:
        _consoles.err.print(f"[bold red]Error:[/] [red]{len(cmp.failures)} model(s) failed; "
                            "the others' results are kept:[/]")
        for f in cmp.failures:
            _consoles.err.print(f"  - {f.model} ({f.stage}): {f.error}: {f.message}", markup=False, highlight=False)
    if cmp.figure_error:
        _consoles.err.print(f"[bold red]Error:[/] [red]No figures: {escape(cmp.figure_error)}[/]\n"
                            "The numbers are written; draw the figures with "
                            f"`probekit plot {escape(str(cmp.run_dir))}`.",
                            highlight=False)
    if cmp.failures or cmp.figure_error:
        raise typer.Exit(code=1)


def _print_notes(notes: list[str]) -> None:
    """What a run could not give and why (run.json ``notes``): one line each."""
    for note in notes:
        _consoles.err.print(f"[yellow]Note:[/] {escape(note)}", highlight=False)


def _report_nonfinite(found: list[dict]) -> None:
    """Say where values are NaN or infinite (they are left out of summary.csv's means)."""
    if not found:
        return
    total = sum(f["values"] for f in found)
    _consoles.err.print(f"[bold yellow]Warning:[/] [yellow]{total} value(s) are NaN or infinite (run.json: "
                        "status nonfinite, see `nonfinite`); summary.csv leaves them out and counts them in "
                        "n_nonfinite:[/]", highlight=False)
    for f in found:
        where = "" if f["layers"] is None else (
            f" in layer(s) {', '.join(map(str, f['layers']))} on {len(f['images'])} image(s) "
            f"({', '.join(f['images'][:3])}{', ...' if len(f['images']) > 3 else ''})")
        _consoles.err.print(f"  - {f['model']} {f['metric']}: {f['values']} of {f['of']}{where}",
                            markup=False, highlight=False)


def _print_contrasts(table: Any) -> None:
    """One line per metric, layer and pair of groups (the statistics of ``contrasts.csv``)."""
    if table is None or not len(table):
        return
    from probekit.views.contrasts import contrast_header, format_contrast

    for (metric, ga, gb), rows in table.groupby(["metric", "group_a", "group_b"], sort=False):
        _consoles.out.print(f"[bold]{escape(metric)}: {escape(ga)} vs {escape(gb)}[/] "
                            f"({escape(contrast_header(rows))})", highlight=False)
        for _, row in rows.iterrows():
            _consoles.out.print("  " + format_contrast(row), markup=False, highlight=False)


def _run_dir_arg(run_dir: str) -> str | Path:
    """RUN_DIR as a path, or an s3:// address as given; a local run directory that is not there fails
    before the plotting libraries load (a store's is read by the command itself)."""
    from probekit._io.storage import is_uri

    if is_uri(run_dir):
        return run_dir
    if not Path(run_dir).is_dir():
        from probekit.errors import RunDirError

        raise RunDirError.absent(Path(run_dir))
    return Path(run_dir)


ReportOpt = Annotated[bool, typer.Option(
    "--report/--no-report", help="Write report.html (one self-contained file) and contrasts.csv.",
)]


@app.command("run", epilog="Examples:\n\n  probekit run dino-s16 deit-s --images sample\n\n"
             "  probekit run timm:vit_small_patch16_224 --no-pretrained --metric mad --metric-option units=patch "
             "--images ./photos --out runs/control")
@_handled
def run_cmd(
    models: Annotated[list[str], typer.Argument(
        metavar="MODEL", help="One or more aliases or specs to probe on the same images.",
    )],
    images: Annotated[list[str] | None, typer.Option(
        "--images", "-i", help="A folder, an image file, or [bold]sample[/] for the bundled photos; "
                               "repeat for several (default: sample).",
    )] = None,
    metric: Annotated[list[str] | None, typer.Option(
        "--metric", "-m", help="A metric from `probekit metrics`; repeat for several (default: mad).",
    )] = None,
    metric_option: Annotated[list[str] | None, typer.Option(
        "--metric-option", help="A metric option KEY=VALUE (or METRIC.KEY=VALUE for one metric); repeat for several.",
    )] = None,
    option: Annotated[list[str] | None, typer.Option(
        "--option", "-o", help="A model option KEY=VALUE for every model, e.g. img_size=224; repeat for several.",
    )] = None,
    out_dir: Annotated[str | None, typer.Option(
        "--out", help="The run directory (default: runs/run). Rerunning into it reuses finished parts.",
    )] = None,
    count: Annotated[int | None, typer.Option(help="Probe a seeded random subset of this many images.")] = None,
    image_size: Annotated[int | None, typer.Option(
        help="Input size in pixels (default: each model's native size).",
    )] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 16,
    device: Annotated[str | None, typer.Option(help="Where to run: cpu, cuda, cuda:1 (default: cpu).")] = None,
    dtype: Annotated[str, typer.Option(
        help="Compute dtype: float32, bf16 or fp16 (probabilities stay float32).",
    )] = "float32",
    pretrained: Annotated[bool | None, typer.Option(
        "--pretrained/--no-pretrained",
        help="Force pretrained weights or random init for every model (default: each alias's own).",
    )] = None,
    strict: Annotated[bool, typer.Option(help="Stop at an unreadable image instead of skipping it.")] = False,
    workers: Annotated[int, typer.Option(help="DataLoader workers that decode images.")] = 0,
    figures: Annotated[bool, typer.Option("--figures/--no-figures", help="Draw the figures (needs seaborn).")] = True,
    report: ReportOpt = True,
):
    """Probe MODELS on one image set and write a run directory with results, summary and figures.

    A run directory holds results.parquet, summary.csv (mean and 95% CI), run.json and figures/.
    Finished parts are cached: an interrupted run resumes when you run the same command again.
    """
    from probekit.runs.config import as_config, check_names

    images = images or ["sample"]
    metric = metric or ["mad"]
    model_opts = _parse_options(option, "--option")
    if pretrained is not None:
        model_opts["pretrained"] = pretrained
    cfg = as_config({
        "name": "run",
        "models": [{"model": m, "options": dict(model_opts)} for m in models],
        "images": {"path": images, "count": count},
        "metrics": [{"name": m, "options": _metric_options(m, metric, metric_option)} for m in metric],
        "image_size": image_size, "batch_size": batch_size, "device": device, "dtype": dtype,
        "strict": strict, "workers": workers, "out": out_dir or "runs/run",
    })
    check_names(cfg)  # typos in models, metrics and image folders fail here, before torch loads
    _run_comparison(cfg, None, figures, report)


def _metric_options(name: str, all_names: list[str], pairs: list[str] | None) -> dict[str, Any]:
    """Options for metric ``name``: ``KEY=VALUE`` applies to all, ``NAME.KEY=VALUE`` to one."""
    opts = {}
    for key, val in _parse_options(pairs, "--metric-option").items():
        target, dot, k = key.rpartition(".")
        if dot and target not in all_names:
            raise typer.BadParameter(f"{key!r} names metric {target!r}, which is not among --metric {all_names}.",
                                     param_hint="--metric-option")
        if not dot or target == name:
            opts[k] = val
    return opts


@app.command("compare", epilog="Examples:\n\n  probekit compare configs/quickstart.yaml\n\n"
             "  probekit compare my-run.yaml --out runs/today --device cuda --batch-size 64")
@_handled
def compare_cmd(
    run_file: Annotated[Path, typer.Argument(
        metavar="RUN.yaml", help="A YAML run file (see configs/quickstart.yaml).",
    )],
    out_dir: Annotated[str | None, typer.Option(
        "--out", help="The run directory (default: the file's `out`, else runs/<name>).",
    )] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per forward pass (over the file's value).")] = None,
    device: Annotated[str | None, typer.Option(help="Where to run: cpu, cuda (over the file's value).")] = None,
    dtype: Annotated[str | None, typer.Option(
        help="Compute dtype: float32, bf16 or fp16 (over the file's value).",
    )] = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader workers (over the file's value).")] = None,
    figures: Annotated[bool, typer.Option("--figures/--no-figures", help="Draw the figures (needs seaborn).")] = True,
    engine: Annotated[str | None, typer.Option(
        help="local (default) or ray: every model at once on a Ray cluster, cached per shard "
             "(pip install \"probekit\\[ray]\").",
    )] = None,
    address: Annotated[str | None, typer.Option(
        help="The Ray cluster: auto, or ray://host:port (default: start a local one).",
    )] = None,
    report: ReportOpt = True,
):
    """Run the comparison a run file describes; the file is checked fully before any model loads.

    Flags given here win over the file's values. Finished parts are cached in the run
    directory, so running the same file again only computes what is missing.
    """
    from probekit.runs.config import check_names, load_run

    cfg = load_run(run_file)
    check_names(cfg)  # typos in models, metrics and image folders fail here, before torch loads
    _run_comparison(cfg, out_dir, figures, report, batch_size=batch_size, device=device, dtype=dtype, workers=workers,
                    engine=engine, address=address)


@app.command("plot", epilog="Examples:\n\n  probekit plot runs/quickstart\n\n"
             "  probekit plot runs/run --kind depth --kind overlay")
@_handled
def plot_cmd(
    run_dir: Annotated[str, typer.Argument(
        metavar="RUN_DIR", help="A run directory written by `probekit run` or `probekit compare` (a path or s3://...).",
    )],
    kind: Annotated[list[str] | None, typer.Option(
        "--kind", "-k", help="depth, overlay, heatmap, summary, maps, labels or accuracy; repeat for several "
        "(default: all).",
    )] = None,
    metric: Annotated[list[str] | None, typer.Option(
        "--metric", "-m", help="Metric labels to draw (default: all).",
    )] = None,
):
    """Draw figures (PNG and SVG) from a run directory's results.parquet into its figures/ folder."""
    where = _run_dir_arg(run_dir)
    from probekit.views.outputs import redraw

    notes: list[str] = []
    paths = redraw(where, kinds=kind, metrics=metric, notes=notes)
    for p in paths:
        _consoles.out.print(str(p), highlight=False)
    _consoles.err.print(f"Wrote {len(paths)} figure files to {str(where).rstrip('/')}/figures.")
    _print_notes(notes)


@app.command("report", epilog="Examples:\n\n  probekit report runs/quickstart")
@_handled
def report_cmd(
    run_dir: Annotated[str, typer.Argument(
        metavar="RUN_DIR", help="A run directory written by `probekit run` or `probekit compare` (a path or s3://...).",
    )],
):
    """Write RUN_DIR/report.html: one self-contained page (provenance, charts, contrasts, attention explorer).

    The explorer shows what the run stored for its showcase images; a run made with
    --no-report has none (run it again without the flag: only the explorer is computed).
    """
    where = _run_dir_arg(run_dir)
    from probekit.views.report import rebuild

    path = rebuild(where)
    _consoles.out.print(str(path), highlight=False)
    size = f" ({path.stat().st_size / 2**20:.1f} MB)" if isinstance(path, Path) else ""
    _consoles.err.print(f"Wrote {path}{size}.", highlight=False)


def main() -> None:
    """Console-script entry point (``probekit``)."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
