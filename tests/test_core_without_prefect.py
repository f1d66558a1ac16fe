"""The library must import and run its stages with Prefect unavailable (ARCHITECTURE §2)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _pipeline_modules() -> list[str]:
    mods = []
    for p in sorted((ROOT / "pipeline").rglob("*.py")):
        rel = p.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods.append(".".join(parts))
    return mods


def test_every_pipeline_module_imports_with_prefect_blocked() -> None:
    mods = _pipeline_modules()
    assert "pipeline.job.stages" in mods
    code = (
        "import sys\n"
        "sys.modules['prefect'] = None\n"  # any 'import prefect' now raises ImportError
        f"import importlib\nfor m in {mods!r}:\n    importlib.import_module(m)\n"
        "assert sys.modules['prefect'] is None\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("ok")


@pytest.mark.parametrize("path", sorted((ROOT / "pipeline").rglob("*.py")), ids=lambda p: p.name)
def test_no_prefect_import_in_pipeline_source(path: Path) -> None:
    text = path.read_text()
    assert "import prefect" not in text and "from prefect" not in text
    # the library never imports a roof, not even inside a function: flows/ or the dptab CLI
    assert "from flows" not in text and "import flows" not in text
    assert "from dptab" not in text and "import dptab" not in text
