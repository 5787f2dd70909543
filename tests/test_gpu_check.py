"""The prepared GPU check (`scripts/gpu_check.py`): its CPU smoke mode runs every section end to end, so the script a
GPU session runs in one call cannot rot; its failure isolation, time budget and GPU-aware timing behave."""

import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import gpu_check  # noqa: E402

from cgpo_trl.saliency.metrics import SIS_METRICS, SOD_METRICS  # noqa: E402
from cgpo_trl.saliency.tags import parse_answer  # noqa: E402


def numbers(value, path=""):
    """Every number in a JSON tree, with its path."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from numbers(item, f"{path}/{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from numbers(item, f"{path}[{index}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


@pytest.mark.slow
def test_smoke_runs_every_section_with_finite_numbers(tmp_path):
    out = tmp_path / "gpu_check.json"
    for name in ("vlm_evf_sam", "vlm_evf_sam2"):  # a previous run's leftovers must not be resumed
        stale = tmp_path / "work" / name / "predict" / "predictions.jsonl"
        stale.parent.mkdir(parents=True)
        stale.write_text("stale\nstale\n")
    gpu_check.main(["--smoke", "--out", str(out)])
    results = json.loads(out.read_text())
    sections = results["sections"]

    assert list(sections) == list(gpu_check.SECTIONS)
    assert {name: data["status"] for name, data in sections.items()} == dict.fromkeys(gpu_check.SECTIONS, "ok")
    bad = [(path, v) for path, v in numbers(sections) if not math.isfinite(v)]
    assert not bad
    assert sections["environment"]["packages"]["trl"] == "1.16.0"

    lm = sections["lm"]
    setup = gpu_check.SMOKE
    assert set(lm["summary"]) == set(gpu_check.LM_CONFIGS)
    for name, summary in lm["summary"].items():
        group = gpu_check.LM_CONFIGS[name].get("num_generations", 1)
        # Equal prompts per step: GRPO samples G completions of each, CGPO one.
        assert summary["completions_per_step"] == setup.lm_prompts * group
        assert summary["measured_steps"] == setup.repeats * (setup.steps - 1)
        assert summary["wall"] > 0 and summary["generation"] > 0 and summary["forward_backward"] > 0
        assert summary["peak_memory_mib"] > 0
        # Only `max_prob` projects hidden states through the LM head again.
        assert (summary["max_logprob"] > 0) == (name in ("CGPO", "CGPO gc"))
    assert set(lm["step_time_ratios"]) == {f"{a} / {b}" for a, b in gpu_check.RATIOS}
    assert all(ratio["median"] > 0 for ratio in lm["step_time_ratios"].values())

    rows = gpu_check.saliency_rows(setup, setup.vlm_prompts * setup.steps)
    expressions = sum(len(parse_answer(s).regions or parse_answer(s).instances) for s in rows["solution"])
    for name, family in (("vlm_evf_sam", "EVF-SAM"), ("vlm_evf_sam2", "EVF-SAM2")):
        data = sections[name]
        segmenter = data["segmenter"]
        assert (segmenter["family"], segmenter["device"], segmenter["dtype"]) == (family, "cpu", "torch.float32")
        # Every reference expression of every row went through the segmenter inside the training steps.
        assert segmenter["pairs_segmented_in_training"] == expressions
        assert len(data["run"]["grad_norm"]) == setup.steps and all(g > 0 for g in data["run"]["grad_norm"])
        assert data["summary"]["reward"] > 0 and "rewards/reference_saliency/mean" in data["last_logs"]
        assert set(SOD_METRICS) <= set(data["sod"]) and data["sod"]["num_images"] == sum(
            task == "sod" for task in rows["task"]
        )
        assert set(data["sis"]) == set(SIS_METRICS) and all(0 <= v <= 1 for v in data["sis"].values())


def test_builders_take_an_lm_head_larger_than_the_tokenizer_and_other_head_counts():
    from cgpo_trl.testing import build_tiny_lm, build_tiny_vlm, image_prompt_dataset

    lm, tokenizer = build_tiny_lm(config_overrides={"vocab_size": 1024})
    assert lm.get_output_embeddings().weight.shape[0] == 1024 and len(tokenizer) < 1024

    vlm, processor = build_tiny_vlm(text_config={"vocab_size": 1024, "num_attention_heads": 8})
    assert vlm.config.text_config.rope_parameters["mrope_section"] == [0, 4, 4]  # head_dim 128 / 8 = 16
    row = image_prompt_dataset(1)[0]
    text = processor.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[row["images"]], return_tensors="pt")
    with torch.no_grad():
        assert vlm(**inputs).logits.shape[-1] == 1024


def test_gpu_sizes_are_the_documented_shapes():
    from cgpo_trl.testing import build_tiny_lm, build_tiny_vlm

    with torch.device("meta"):
        lm, _ = build_tiny_lm(**gpu_check.GPU.lm)
        vlm, _ = build_tiny_vlm(**gpu_check.GPU.vlm)
    assert sum(p.numel() for p in lm.parameters()) == 494_032_768  # Qwen2.5-0.5B's count
    assert sum(p.numel() for p in vlm.parameters()) == 434_278_080
    for model in (lm, vlm):
        assert model.get_output_embeddings().weight.shape[0] == 151_936


def test_documented_device_command_fits_the_run_limits():
    root = Path(gpu_check.ROOT)
    doc = (root / "docs" / "gpu_check.md").read_text()
    command = doc.split("- `command`:\n\n```bash\n")[1].split("\n```")[0]
    assert len(command) <= 2000  # the device tool's limit
    assert f"the command is {len(command)} characters" in doc
    wheels = re.search(r"^DEST=\$\{DEST:-(\S+)\}$", (root / "scripts" / "gpu_wheels.sh").read_text(), re.M).group(1)
    assert f"{wheels}/*.whl" in command and f'`carry`: `["{wheels}"]`' in doc
    assert f"{wheels}/" in (root / ".gitignore").read_text().splitlines()  # carried, so it must not travel twice
    script_limit = int(re.search(r"timeout (\d+) python3 scripts/gpu_check.py", command).group(1))
    run_limit = int(re.search(r"`timeout_s`: `(\d+)`", doc).group(1))
    assert gpu_check.GPU.budget_s + 60 <= script_limit < run_limit <= 600


def test_lm_summary_leaves_out_warm_up_steps_and_pairs_ratios_within_a_repeat(tmp_path, monkeypatch):
    walls = {("CGPO", 1): 2.0, ("GRPO G=4", 0): 4.0, ("GRPO G=4", 1): 5.0}

    def fake_run(setup, name, work, deadline):
        repeat = int(work.name.removeprefix("repeat"))
        if name == "CGPO" and repeat == 0:
            raise RuntimeError("simulated failure")
        wall = walls.get((name, repeat), 1.0)
        step = dict.fromkeys(gpu_check.PHASES, 0.5) | dict(completions=2, completion_tokens=16)
        warm_up = step | dict(wall=100.0)
        return dict(parameters=7, steps=[warm_up, step | dict(wall=wall)], peak_memory_mib=10.0 * (repeat + 1))

    monkeypatch.setattr(gpu_check, "lm_run", fake_run)
    monkeypatch.setattr(gpu_check, "free_memory", lambda: None)
    setup = dataclasses.replace(gpu_check.SMOKE, repeats=2)
    data = gpu_check.lm_section(setup, tmp_path, deadline=time.monotonic() + 60)

    assert data["status"] == "partial" and list(data["errors"]) == ["CGPO #0"]
    assert data["runs"]["CGPO"][0] is None
    assert data["summary"]["CGPO"]["wall"] == 2.0 and data["summary"]["CGPO"]["measured_steps"] == 1
    assert data["summary"]["GRPO G=4"]["wall"] == 4.5 and data["summary"]["GRPO G=4"]["peak_memory_mib"] == 20.0
    assert data["step_time_ratios"]["CGPO / GRPO G=4"]["per_repeat"] == [2.0 / 5.0]  # repeat 1 with repeat 1


def test_a_failing_section_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(setup, work, deadline):
        raise RuntimeError("simulated CUDA out of memory")

    monkeypatch.setitem(gpu_check.SECTIONS, "lm", broken)
    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--smoke", "--out", str(out), "--sections", "lm", "environment"])
    sections = json.loads(out.read_text())["sections"]
    assert sections["lm"]["status"] == "error"
    assert "RuntimeError: simulated CUDA out of memory" in sections["lm"]["traceback"]
    assert sections["environment"]["status"] == "ok"


def test_sections_past_the_time_budget_are_skipped(tmp_path):
    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--smoke", "--out", str(out), "--budget_s", "0"])
    sections = json.loads(out.read_text())["sections"]
    assert sections["environment"]["status"] == "ok"
    for name in ("lm", "vlm_evf_sam", "vlm_evf_sam2"):
        assert sections[name]["status"] == "skipped" and "time budget" in sections[name]["reason"]
    assert not (tmp_path / "work").exists()  # nothing was built or trained


def test_gpu_mode_needs_a_cuda_device(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path / "gpu_check.json")])
    assert "no CUDA device is visible; --smoke runs the CPU version" in capsys.readouterr().err


class FakeTrainer:
    """The methods `StepProfiler` times; `launch` queues device work the way CUDA kernels are queued: it finishes
    only when someone synchronises."""

    calibrator = None

    def __init__(self, device):
        self.device = device
        self.model = torch.nn.Linear(1, 1)
        self.accelerator = SimpleNamespace(unwrap_model=lambda model: model)

    def add_callback(self, callback):
        pass

    def _generate(self):
        pass

    def _calculate_rewards(self):
        pass

    def _prepare_inputs(self):
        pass

    def _generate_and_score_completions(self, inputs):
        return inputs

    def _max_logprob(self):
        pass

    def _log_cgpo_metrics(self):
        pass

    def training_step(self):
        self.device.launch(0.3)  # the loss forward's kernels
        self._advantages()

    def _advantages(self):
        self.device.launch(0.05)  # the confidence's own kernels


class FakeDevice:
    def __init__(self):
        self.queued = 0.0

    def launch(self, seconds):
        self.queued += seconds

    def synchronize(self):
        time.sleep(self.queued)
        self.queued = 0.0


def test_synced_profiler_charges_queued_device_work_to_the_phase_that_queued_it(monkeypatch):
    device = FakeDevice()
    monkeypatch.setattr(gpu_check, "synchronize", device.synchronize)
    trainer = FakeTrainer(device)
    profiler = gpu_check.SyncedStepProfiler(trainer)
    state = SimpleNamespace(global_step=1)
    profiler.on_step_begin(None, state, None)
    trainer.training_step()
    profiler.on_step_end(None, state, None)
    (step,) = profiler.steps
    # Without the wait before it, the confidence phase would absorb the forward's 0.3 s; without the wait after it,
    # its own 0.05 s would land in the next phase.
    assert 0.05 <= step["confidence"] < 0.2
    assert step["forward_backward"] >= 0.35
