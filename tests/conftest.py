import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def colin27():
    "The default data set's splits; skips the test where Debian's mricron-data is not installed."
    from medseg_nbdev.data import MissingDataError, load_dataset

    try:
        return load_dataset("colin27-hippocampus")
    except MissingDataError as error:
        pytest.skip(f"mricron-data is not installed: {error}")


@pytest.fixture
def data_home(tmp_path, monkeypatch):
    "An empty, private MEDSEG_DATA folder."
    monkeypatch.setenv("MEDSEG_DATA", str(tmp_path / "medseg-data"))
    return tmp_path / "medseg-data"
