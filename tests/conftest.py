"""Test-wide settings: offline hub, deterministic CPU torch, small thread counts."""

import importlib.util
import os
import sys
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


@pytest.fixture
def toy_backend():
    """The toy backend of tests/_toy.py, registered for one test only (other tests see none)."""
    import probekit as pk

    toy = _load_helper("probekit_tests_toy", "_toy.py")
    toy.load_toy()
    yield toy
    pk.adapters.unregister("toy")


@pytest.fixture
def run_cli(monkeypatch):
    """The probekit command run in-process by typer's CliRunner, as a user sees it (no PROBEKIT_DEBUG)."""
    from typer.testing import CliRunner

    from probekit.cli import app

    monkeypatch.delenv("PROBEKIT_DEBUG", raising=False)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])
