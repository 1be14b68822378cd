"""The package layout (docs/design.md section 1): top-level kernels/ and patches/ folders ship *inside* the package
namespace (hf_striped.kernels, hf_striped.patches), never as top-level modules that would clash
with the Hugging Face ``kernels`` package."""

import importlib.metadata
from pathlib import Path

import pytest

import hf_striped
import hf_striped.kernels
import hf_striped.patches


def test_subpackages_import_inside_the_namespace():
    assert hf_striped.kernels.__name__ == "hf_striped.kernels"
    assert hf_striped.patches.__name__ == "hf_striped.patches"
    assert callable(hf_striped.kernels.select_kernel)


def test_installed_wheel_has_only_the_hf_striped_namespace():
    dist = importlib.metadata.distribution("hf-striped")
    files = [str(f) for f in dist.files or []]
    if any("__editable__" in f for f in files):
        pytest.skip("editable install: the wheel layout is proven by the non-editable install of scripts/test.sh")
    top = {Path(f).parts[0] for f in files if not f.startswith("..")}
    assert top <= {"hf_striped", f"hf_striped-{dist.version}.dist-info"}, top
    assert {"hf_striped/kernels/__init__.py", "hf_striped/patches/__init__.py"} <= set(files)
    assert Path(hf_striped.kernels.__file__).parent.parent == Path(hf_striped.__file__).parent
