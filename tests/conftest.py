"""Shared test helpers: free ports for Ray and torch.distributed, and the `slow` marker."""
import os

import pytest

from pipeline.distributed import free_port  # noqa: F401  (tests import it from here)

# Everything in tests talks to this machine only.
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("RAY_ADDRESS", "")  # never join a cluster by accident
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts Ray or several ranks; skipped by `make test-fast`")


@pytest.fixture
def port() -> int:
    return free_port()
