"""Test-wide settings: offline hub, deterministic CPU torch, small thread counts."""

import importlib.util
import os
import sys
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

# the fused kernel's checks need TRITON_INTERPRET=1 from process start: test_kernel.py runs them
# in a child process with it; the main run must not import them (doctest collection would)
if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore = ["kernel_cases.py"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _close_figures():
    """Every figure a test drew is closed after it: pyplot keeps figures until closed, and past 20
    open ones it warns (an error here: the warning is attributed to probekit's plotting code)."""
    yield
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


# -- helper files of tests/ ---------------------------------------------------------------------
# Under --import-mode=importlib test files cannot import each other and tests/ is not on sys.path,
# so the helper files are imported here, once, under fixed names that test files then import
# (``from probekit_tests_helpers import ...``); _toy.py keeps the name the engine tests use.
def _load_helper(name: str, filename: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(filename))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


_load_helper("probekit_tests_helpers", "_helpers.py")
_load_helper("probekit_tests_windowed", "_windowed_models.py")
_load_helper("probekit_tests_hidden", "_hidden_reference.py")


@contextmanager
def _toy_registered():
    import probekit as pk

    toy = _load_helper("probekit_tests_toy", "_toy.py")
    toy.load_toy()
    try:
        yield toy
    finally:
        pk.adapters.unregister("toy")


@pytest.fixture
def toy_backend():
    """The toy backend of tests/_toy.py, registered for one test only (other tests see none)."""
    with _toy_registered() as toy:
        yield toy


@pytest.fixture(scope="module")
def toy_backend_module():
    """The toy backend, registered for one test module's module-scoped fixtures (e.g. one run that
    its tests share), and unregistered after that module."""
    with _toy_registered() as toy:
        yield toy


@pytest.fixture
def loads(monkeypatch, toy_backend):
    """Count (and optionally sabotage) model loads: wraps probekit.models.load."""
    import probekit.models

    real = probekit.models.load
    calls: list[str] = []
    state = {"interrupt_at": None}

    def counting(name, **kw):
        calls.append(kw.get("label", name))
        if state["interrupt_at"] is not None and len(calls) == state["interrupt_at"]:
            raise KeyboardInterrupt
        return real(name, **kw)

    monkeypatch.setattr(probekit.models, "load", counting)
    counting.calls, counting.state = calls, state
    return counting


# the smallest run file: tests give the keys they care about over it (their own base dict first)
RUN_FILE = {"models": ["toy:vit"], "images": {"path": "sample", "count": 2}, "metrics": ["mad"], "figures": []}


@pytest.fixture
def run_file(tmp_path):
    """Write a run file and return its path: ``run_file(base=None, file="run.yaml", **keys)``.

    The keys are ``base`` (default :data:`RUN_FILE`) with ``keys`` over it, in that order (a key
    set to None is left out), written to ``tmp_path / file`` a line per key, as people write run
    files: a list holding mappings one item per line group (``  - model: ...`` then ``    label:
    ...``), every other value in YAML's flow style; so a test can name the line a key is on
    (``run_file(RUN, models=[...], file="r2.yaml")``).
    """

    def write(base: dict | None = None, file: str = "run.yaml", **keys) -> Path:
        data = {k: v for k, v in {**(RUN_FILE if base is None else base), **keys}.items() if v is not None}
        path = tmp_path / file
        path.write_text(_run_yaml(data))
        return path

    return write


def _run_yaml(data: dict) -> str:
    """The run file's text for ``data`` (see :func:`run_file`)."""
    import yaml

    def flow(value) -> str:
        text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6)
        return text.removesuffix("...\n").strip()  # a scalar ends its document

    lines = []
    for key, value in data.items():
        if isinstance(value, list) and any(isinstance(item, dict) for item in value):
            lines.append(f"{key}:")
            for item in value:
                pairs = item.items() if isinstance(item, dict) else [(None, item)]
                for i, (k, v) in enumerate(pairs):
                    lines.append(("  - " if i == 0 else "    ") + (flow(v) if k is None else f"{k}: {flow(v)}"))
        else:
            lines.append(f"{key}: {flow(value)}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def run_cli(monkeypatch):
    """The probekit command run in-process by typer's CliRunner, as a user sees it (no PROBEKIT_DEBUG)."""
    from typer.testing import CliRunner

    from probekit.cli import app

    monkeypatch.delenv("PROBEKIT_DEBUG", raising=False)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def python_threads(monkeypatch):
    """A context in which the C kernels take their fallback for a compiler without OpenMP: their rows or
    work items split across 2 Python threads (probekit.engine.kernels.cpu), as on such a machine."""
    from probekit.engine.kernels import cpu as cpu_kernel

    @contextmanager
    def fallback():
        with monkeypatch.context() as patch:
            patch.setattr(cpu_kernel.library(), "openmp", False)
            old = torch.get_num_threads()
            torch.set_num_threads(2)
            try:
                yield
            finally:
                torch.set_num_threads(old)

    return fallback
