"""What pip installs: every package folder, the kernels under our own name, and the extras split."""

from __future__ import annotations

import configparser
import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import caprese_peft
from caprese_peft.extras import MissingExtraError, require

ROOT = Path(caprese_peft.__file__).resolve().parents[1]
SETUP = configparser.ConfigParser()
SETUP.read(ROOT / "setup.cfg")


def listed_packages() -> list[str]:
    return SETUP["options"]["packages"].split()


def test_every_package_folder_is_listed():
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "caprese_peft").rglob("__init__.py")}
    found.add("caprese_peft.kernels")  # the repo folder kernels/, mapped by package_dir
    assert sorted(found) == sorted(listed_packages())
    assert SETUP["options"]["package_dir"].split() == ["caprese_peft.kernels", "=", "kernels"]


def _run(code: str, *flags: str) -> str:
    return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, check=True).stdout


def test_the_installed_distribution_has_no_top_level_kernels():
    """transformers probes importlib.util.find_spec("kernels") for Hugging Face's package: ours must not answer."""
    top_level = importlib.metadata.distribution("caprese-peft").read_text("top_level.txt")
    assert top_level is not None and top_level.split() == ["caprese_peft"]
    # -I: no current folder, PYTHONPATH or user site on sys.path: only what is installed
    code = (
        "import importlib.util as u; spec = u.find_spec('kernels'); "
        "print(spec.origin if spec else None); print(u.find_spec('caprese_peft.kernels').origin)"
    )
    top, ours = _run(code, "-I").split()
    assert top == "None" or Path(top).resolve().parent != ROOT / "kernels"
    assert Path(ours).resolve() == ROOT / "kernels" / "__init__.py"


def test_a_checkout_used_without_installing_finds_its_kernels():
    """As on a machine that cannot install: PYTHONPATH=<checkout>, no editable finder."""
    code = (
        "import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in str(f)]; "
        f"sys.path.insert(0, {str(ROOT)!r}); import caprese_peft.kernels as k; print(k.__file__)"
    )
    assert Path(_run(code, "-I").strip()).resolve() == ROOT / "kernels" / "__init__.py"


def test_a_checkout_root_on_the_path_does_not_pass_for_hugging_face_kernels():
    """``python -m pytest`` and the benchmark scripts put the checkout's root on sys.path, beside the kernels folder."""
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
        "from transformers.utils.import_utils import is_kernels_available; import transformers.modeling_utils; "
        "import kernels, caprese_peft.kernels as ours; "
        "print(is_kernels_available(), hasattr(kernels, 'cats_ff'), hasattr(ours, 'cats_ff'))"
    )
    assert _run(code, "-I").split() == ["False", "False", "True"]


@pytest.mark.slow
def test_the_wheel_installs_the_kernels_inside_the_package(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("caprese_peft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "caprese_peft/kernels/cats_ff.py" in names and "caprese_peft/kernels/cpu_ff.cpp" in names
    assert not [n for n in names if n.startswith("kernels/")]


def test_generation_needs_no_extra():
    """Loading an adapter and generating imports none of the extras' packages."""
    code = (
        "import sys, caprese_peft, caprese_peft.fast_decode, caprese_peft.decoding; "
        "print(sorted({'datasets', 'trl', 'matplotlib', 'math_verify', 'gguf', 'lm_eval'} & set(sys.modules)))"
    )
    assert _run(code).strip() == "[]"
    required = " ".join(importlib.metadata.requires("caprese-peft"))
    base = [r for r in importlib.metadata.requires("caprese-peft") if "extra ==" not in r]
    assert not [r for r in base if r.split(">")[0].split("=")[0].strip() in ("trl", "datasets", "math-verify", "gguf")]
    assert 'extra == "train"' in required and 'extra == "gguf"' in required


@pytest.mark.parametrize(("module", "extra"), [("datasets", "train"), ("math_verify", "eval"), ("gguf", "gguf")])
def test_a_missing_extra_names_the_install(monkeypatch, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(MissingExtraError, match=rf"pip install 'caprese-peft\[{extra}\]'"):
        require(module, "This")


def test_answer_checking_without_math_verify_fails_loudly(monkeypatch):
    from caprese_peft.eval.metrics import check_answer

    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(MissingExtraError, match=r"caprese-peft\[eval\]"):
        check_answer("72", "#### 72")  # before: every answer silently counted as wrong
