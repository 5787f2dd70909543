"""Shared pytest fixtures."""

import socket

import pytest


@pytest.fixture
def free_port() -> int:
    """A TCP port nothing listens on, for a distributed run's rendezvous (fixed ports collide across runs)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
