import pathlib

import pytest

DATA = pathlib.Path(__file__).parent / "data" / "openpi"


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """openpi's checkpoint layout and conformance vectors (copied from openpi; see its README)."""
    return DATA
