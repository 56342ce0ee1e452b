"""Shared test fixtures: the reference folder of the original ALBEF and the packaged BERT vocabulary."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REF_DIR = Path(os.environ.get("ALBEF_REF_DIR", ROOT.parent / "shared" / "fixtures" / "albef_ref"))


@pytest.fixture(scope="session")
def ref_dir() -> Path:
    if not REF_DIR.is_dir():
        raise FileNotFoundError(f"reference fixtures not found at {REF_DIR} (set ALBEF_REF_DIR)")
    return REF_DIR
