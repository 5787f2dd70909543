"""The benchmark scripts run end to end in their --smoke mode and write finite numbers under the keys the README
tables are made from."""

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from cgpo_trl.testing import save_tiny_vlm

    return Path(save_tiny_vlm(tmp_path_factory.mktemp("bench") / "tiny_vlm"))


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_cgpo_vs_grpo_smoke(tmp_path, checkpoint):
    import cgpo_vs_grpo

    out = tmp_path / "out"
    cgpo_vs_grpo.main(
        [
            "--smoke",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
            "--checkpoint",
            str(checkpoint),
            "--configs",
            "CGPO",
            "GRPO G=4",
        ]
    )
    results = json.loads((out / "cgpo_vs_grpo.json").read_text())
    table = (out / "cgpo_vs_grpo.md").read_text().splitlines()
    assert sum(line.startswith("| CGPO |") for line in table) == 2  # one row per regime
    assert sum("| CGPO | " in line and line.startswith("| CGPO step wall time") for line in table) == 2
    assert (out / "cgpo_vs_grpo.png").stat().st_size > 0
    for regime in ("latency", "compute"):
        data = results["regimes"][regime]
        summary = data["summary"]
        for name in ("CGPO", "GRPO G=4"):
            s = summary[name]
            for key in (
                "wall",
                "generation",
                "reward",
                "forward_backward",
                "completion_tokens",
                "forward_calls",
                "peak_rss_mib",
                "held_out_final",
            ):
                assert finite(s[key]), (regime, name, key, s[key])
            assert s["wall"] > 0 and s["forward_calls"] >= 1
        # CGPO draws one completion per prompt, GRPO four: 2 prompts per step in smoke mode.
        assert summary["CGPO"]["completions"] == 2 and summary["GRPO G=4"]["completions"] == 8
        assert summary["CGPO"]["confidence"] > 0 and summary["GRPO G=4"]["confidence"] == 0
        assert 0 <= summary["GRPO G=4"]["frac_reward_zero_std"] <= 1
        assert summary["CGPO"]["frac_reward_zero_std"] is None
        runs = data["runs"]["CGPO"][0]
        assert [p["step"] for p in runs["held_out"]][0] == 0 and runs["held_out"][-1]["completions"] == 16


def test_cgpo_variants_smoke(tmp_path, checkpoint):
    import cgpo_variants

    out = tmp_path / "out"
    cgpo_variants.main(
        ["--smoke", "--out", str(out), "--work", str(tmp_path / "work"), "--checkpoint", str(checkpoint)]
    )
    results = json.loads((out / "cgpo_variants.json").read_text())
    assert set(results["runs"]) == {"token/online (default)", "GRPO G=4"}
    for runs in results["runs"].values():
        run = runs[0]
        assert run["completions"] == 32  # 2 steps x 16 completions for every advantage
        for key in ("accuracy", "Sm", "format", "eos", "reward", "seconds"):
            assert finite(run[key]) and (key == "seconds" or 0 <= run[key] <= 1), (key, run[key])
    assert finite(results["runs"]["token/online (default)"][0]["ece"])
    assert "| token/online (default) | 1 |" in (out / "cgpo_variants.md").read_text()


def test_segmenter_throughput_smoke(tmp_path, checkpoint):
    import segmenter_throughput

    out = tmp_path / "out"
    segmenter_throughput.main(
        ["--smoke", "--out", str(out), "--work", str(tmp_path / "work"), "--checkpoint", str(checkpoint)]
    )
    results = json.loads((out / "segmenter_throughput.json").read_text())
    for name in ("shapes", "clipseg"):
        r = results["backends"][name]
        for key in ("batch1_masks_per_s", "batched_masks_per_s", "cache_cold_masks_per_s", "cache_warm_masks_per_s"):
            assert finite(r[key]) and r[key] > 0, (name, key)
        assert r["cache_misses"] == r["pairs"] and r["cache_hits"] == r["pairs"]  # after the cold pass: all hits
    for name, prompts in (("CGPO", 8), ("GRPO G=4", 2)):  # 2 steps x 4 completions
        run = results["cache_runs"][name]
        assert run["completions"] == 8 and run["prompts"] == prompts and 0 <= run["hit_rate"] <= 1
    assert "| shapes |" in (out / "segmenter_throughput.md").read_text()


def test_single_rollout_smoke(tmp_path, monkeypatch):
    """Every kind of method the comparison runs (CGPO options, TRL's A2PO, GRPO, RLOO) trains a few steps on the
    addition task from a tiny checkpoint, and the report computes the table and the verdict lines from the runs."""
    import single_rollout

    from cgpo_trl.testing import save_tiny_lm

    task = single_rollout.AdditionTask()
    task.steps, task.eval_points = 2, 1
    task.eval_pairs = task.eval_pairs[:8]
    task.train_pairs = task.train_pairs[:16]
    work, out = tmp_path / "work", tmp_path / "out"
    save_tiny_lm(work / "start", hidden_size=128)
    checkpoint = task.prepare(work)
    methods = ["CGPO default", "SPO (tracker, whitened)", "A*-PO (TRL A2PO)", "GRPO G=4", "RLOO G=2"]
    # a random model gets every reference sample wrong; TRL's A2PO would then drop every prompt
    monkeypatch.setitem(single_rollout.METHODS, "A*-PO (TRL A2PO)", ("a2po", {"filter_all_incorrect": False}))
    for method in methods:
        result = single_rollout.run_one(task, method, 0, checkpoint, work / single_rollout.slug(method))
        path = out / "runs" / single_rollout.slug(method) / "seed0.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(result))
        assert [p["step"] for p in result["curve"]] == [2]
        expected = 2 * task.completions_per_step + (16 * 8 if method.startswith("A*-PO") else 0)
        assert result["final"]["completions"] == expected and finite(result["final"]["score"])
    text = single_rollout.report(out, task, {"score": 0.0, "score_se": 0.0})
    assert all(f"| {m} | 1 |" in text for m in methods)
    assert (out / "curves.png").stat().st_size > 0
    assert "CGPO default: does not beat every single-rollout baseline" in text or "CGPO default: beats" in text


def test_single_rollout_saliency_smoke(tmp_path, checkpoint, monkeypatch):
    """The saliency task (tiny VLM, images, KL to the start, the graded `shapes` reward, held-out S-measure) trains
    CGPO and GRPO a few steps each from a checkpoint and scores them in [0, 1]."""
    import shutil

    import single_rollout

    task = single_rollout.SaliencyTask()
    task.steps, task.eval_points, task.completions_per_step = 2, 1, 4
    task.eval_rows = task.common.saliency_rows(4, "test", seed=0)
    monkeypatch.setattr(task, "train_dataset", lambda: task.common.saliency_rows(16, "train", seed=0))
    shutil.copytree(checkpoint, tmp_path / "work" / "start")
    start = task.prepare(tmp_path / "work")
    for method in ["CGPO default", "GRPO G=4"]:
        result = single_rollout.run_one(task, method, 0, start, tmp_path / "work" / single_rollout.slug(method))
        assert result["final"]["completions"] == 2 * task.completions_per_step
        assert 0.0 <= result["final"]["score"] <= 1.0
