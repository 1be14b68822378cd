"""The README's support matrix is generated from the registry and must not drift from it."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("support_matrix", ROOT / "scripts" / "support_matrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_support_matrix_matches_registry():
    sm = _script()
    text = sm.README.read_text(encoding="utf-8")
    assert sm.START in text and sm.END in text, "README.md lost its support-matrix markers"
    assert sm.replace(text, sm.render()) == text, (
        "README.md's support matrix differs from hf_striped.patches.registry; run python scripts/support_matrix.py"
    )


def test_matrix_lists_every_registered_family():
    from hf_striped.patches import REGISTRY

    table = _script().render()
    for model_type in REGISTRY:
        assert f"`{model_type}`" in table
