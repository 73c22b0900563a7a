"""Distribution: one abi3 manylinux wheel that installs into a fresh venv, and an sdist."""

import os
import shutil
import site
import subprocess
import tarfile
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _maturin(*args, cwd=REPO):
    exe = shutil.which("maturin") or pytest.skip("maturin is not installed (pip install 'qpeft[dev]')")
    subprocess.run([exe, *args], cwd=cwd, check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheels")
    _maturin("build", "--release", "--out", str(out))
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_is_abi3_manylinux(wheel):
    name = wheel.name
    assert "-cp310-abi3-" in name, name
    assert "manylinux" in name, name


def test_wheel_installs_and_imports_in_a_fresh_venv(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    # torch is several GB: let the fresh venv see this interpreter's packages
    # through a .pth file, while qpeft itself comes only from the wheel.
    purelib = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    deps = [p for p in site.getsitepackages() if "qpeft" not in p]
    Path(purelib, "outer_site.pth").write_text("\n".join(deps) + "\n")
    # --ignore-installed: the qpeft visible through the .pth must not count as installed.
    subprocess.run([py, "-m", "pip", "install", "--quiet", "--no-deps", "--ignore-installed", str(wheel)], check=True)
    code = (
        "import qpeft, torch, sys;"
        "assert qpeft.__file__.startswith(sys.prefix), qpeft.__file__;"
        "w = torch.randn(128, 64);"
        "p, s = qpeft.quantize_4bit(w, compress_statistics=True);"
        "assert (qpeft.dequantize_4bit(p, s) - w).abs().max() < 1.5;"
        "print(qpeft.cpu_isa())"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([py, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() in ("avx512", "avx2", "scalar")


def test_sdist_holds_the_sources(tmp_path):
    _maturin("sdist", "--out", str(tmp_path))
    (sdist,) = tmp_path.glob("*.tar.gz")
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for needed in ["Cargo.toml", "pyproject.toml", "rust/src/lib.rs", "rust/src/nf4.rs",
                   "python/qpeft/__init__.py", "python/qpeft/_native.pyi", "python/qpeft/py.typed"]:
        assert needed in names, needed


def test_native_stub_lists_every_export():
    import ast

    import qpeft._native as native

    stub = ast.parse((REPO / "python" / "qpeft" / "_native.pyi").read_text())
    declared = {n.name for n in stub.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    # Public names, plus the one private test hook the stub documents.
    exported = {n for n in dir(native) if (not n.startswith("_") or n == "_panic_for_test")
                and callable(getattr(native, n))}
    assert declared == exported


def test_wheel_ships_the_cuda_sources(wheel):
    """The CUDA kernels are compiled at run time from sources inside the package."""
    import zipfile

    from qpeft import _cuda

    names = set(zipfile.ZipFile(wheel).namelist())
    for f in _cuda.KERNEL_FILES + ("common.cuh", "codebook.cuh", "code8.cuh"):
        assert f"qpeft/cuda/{f}" in names, f
    assert not any(n.startswith("cuda/") for n in names), "kernels must not land in site-packages/cuda (NVIDIA's namespace)"
