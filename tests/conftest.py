"""Session-wide test environment: W&B stays offline and writes nothing outside a temp folder."""

import os
import tempfile

import pytest

from tests.skip_report import pytest_terminal_summary  # noqa: F401 - a hook: says which browser tests were skipped


@pytest.fixture(autouse=True, scope="session")
def _offline_wandb():
    """Offline mode, and W&B's data/cache/config folders (artifact staging included) in a temp dir."""
    with tempfile.TemporaryDirectory(prefix="li-wandb-") as root:
        previous = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_SILENT", "WANDB_DATA_DIR",
                                                   "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR")}
        os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DATA_DIR=f"{root}/data",
                          WANDB_CACHE_DIR=f"{root}/cache", WANDB_CONFIG_DIR=f"{root}/config")
        yield
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
