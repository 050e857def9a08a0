import os
os.environ.setdefault("FASTPRUNE_TORCH_COMPILE", "0")  # tests compile explicitly where they test compilation
import pathlib

import pytest

DATA = pathlib.Path(__file__).parent / "data" / "openpi"


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """openpi's checkpoint layout and conformance vectors (copied from openpi; see its README)."""
    return DATA


def last_kept(model):
    """What a model's pruner kept in its last eval call: counts, kept_idx, kept_mask."""
    from types import SimpleNamespace

    core = model.token_pruner.core
    return SimpleNamespace(
        counts=core.last_kept_per_sample, kept_idx=core.last_kept_indices_padded, kept_mask=core.last_kept_indices_mask
    )
