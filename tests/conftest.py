import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_IMAGENETTE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "imagenette-64-mini")


@pytest.fixture
def runs_dir(tmp_path):
    """A fresh folder for run directories (``--trainer.default_root_dir``)."""
    return str(tmp_path / "runs")


@pytest.fixture
def imagenette_root():
    """The shared Imagenette sample (development and CI machines only); skips when absent."""
    if not os.path.isdir(os.path.join(SHARED_IMAGENETTE, "train")):
        pytest.skip("../shared/data/imagenette-64-mini not present (it exists on dev/CI machines only)")
    return os.path.abspath(SHARED_IMAGENETTE)
