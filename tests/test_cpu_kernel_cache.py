"""The CPU row kernel's cache never loads a library another user could have put there (issue 19,
item 11's audit: a compiled ``.so`` is code, loaded with ``ctypes.CDLL``).

Its name is computable by anyone (a hash of the C source, compiler, flags and CPU flags), and the
fallback cache was a fixed folder in the shared temporary directory. A library planted in a cache
folder that others can write (world-writable, or owned by another user) would run its
constructor in the victim's process; here such a library creates a marker file. Each test runs
probekit in a child process, so nothing planted is loaded into the test process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from probekit.engine.kernels import cpu as cpu_kernel

pytestmark = [pytest.mark.kernel, pytest.mark.slow]  # each test builds or loads the kernel in a child process

CHILD = """
import os, sys
os.environ["PROBEKIT_CACHE_DIR"] = sys.argv[1]
from probekit.engine.kernels import cpu as cpu_kernel
lib = cpu_kernel.library()
print(lib._name if lib is not None else "NONE")
"""


def _library_path(cache: Path) -> Path:
    out = subprocess.run([sys.executable, "-c", CHILD, str(cache)], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def _plant(where: Path, marker: Path, tmp: Path) -> None:
    """A library with the kernel's ABI whose loading creates ``marker``."""
    src = tmp / "planted.c"
    src.write_text('#include <stdio.h>\n'
                   f'__attribute__((constructor)) static void planted(void) {{ FILE *f = fopen("{marker}", "w"); '
                   'if (f) fclose(f); }\n'
                   f'int pk_abi_version(void) {{ return {cpu_kernel._ABI}; }}\n')
    subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", str(src), "-o", str(where)], check=True)


@pytest.fixture(scope="module")
def private(tmp_path_factory) -> Path:
    """The kernel built once into a private cache (each build takes a while)."""
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.fail("a C compiler is part of the test setup (.ci/run installs gcc)")
    return _library_path(tmp_path_factory.mktemp("private"))


@pytest.fixture
def built_name(private) -> str:
    return private.name


@pytest.mark.parametrize("how", ["world-writable", "owned by another user"])
def test_a_library_planted_in_a_cache_others_can_write_is_never_loaded(tmp_path, built_name, how):
    shared = tmp_path / "shared"
    (shared / "cpu_kernel").mkdir(parents=True)
    marker = tmp_path / "PWNED"
    _plant(shared / "cpu_kernel" / built_name, marker, tmp_path)
    if how == "world-writable":
        os.chmod(shared / "cpu_kernel", 0o777)
    else:
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            pytest.skip("giving a folder to another user needs root (CI runs as root)")
        os.chown(shared / "cpu_kernel", 65534, 65534)
        os.chown(shared / "cpu_kernel" / built_name, 65534, 65534)
    loaded = _library_path(shared)
    assert not marker.exists()
    assert loaded.name == built_name and loaded.parent != shared / "cpu_kernel"  # its own private build


def test_a_library_others_can_write_in_a_private_cache_is_rebuilt(tmp_path, built_name):
    cache = tmp_path / "mine"
    (cache / "cpu_kernel").mkdir(parents=True)
    marker = tmp_path / "PWNED"
    _plant(cache / "cpu_kernel" / built_name, marker, tmp_path)
    os.chmod(cache / "cpu_kernel" / built_name, 0o666)
    loaded = _library_path(cache)
    assert not marker.exists() and loaded == cache / "cpu_kernel" / built_name
    assert not os.stat(loaded).st_mode & 0o022  # replaced by a build of its own


def test_a_private_cache_is_reused(private):
    stamp = os.stat(private).st_mtime_ns
    assert _library_path(private.parent.parent) == private and os.stat(private).st_mtime_ns == stamp
