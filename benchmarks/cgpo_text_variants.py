"""Which CGPO advantage is stable and learns? A measured comparison on a verifiable text task.

Task: two-number addition ("17+5=" -> "<answer>22</answer>") with a tiny random Qwen2 LM from `cgpo_trl.testing`.
The LM is first supervised-fine-tuned until it solves about half of the held-out prompts, then trained by RL from
that one checkpoint with every CGPO level x calibration, the batch-mean-reward baseline (c = 0, batch centring)
and GRPO with G = 4, at the same number of completions per step, for several seeds.

Reported per run: held-out accuracy (4 samples per prompt at temperature 1, and greedy), format rate, EOS rate,
policy-entropy ratio (end / start) and wall time. Writes JSON, a markdown table and a PNG of the accuracy curves.

    python benchmarks/cgpo_text_variants.py --out outputs/bench/text_variants [--seeds 2 --rl_steps 120]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
import time
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from cgpo_trl import CGPOConfig, CGPOTrainer
from cgpo_trl.testing import build_tiny_lm, save_pretrained

ANSWER = re.compile(r"^<answer>(\d+)</answer>$")

VARIANTS: dict[str, dict] = {
    "sequence/geo_mean/none (paper)": dict(
        confidence_level="sequence", confidence="geo_mean", confidence_calibration="none"
    ),
    "sequence/geo_mean/batch": dict(
        confidence_level="sequence", confidence="geo_mean", confidence_calibration="batch"
    ),
    "sequence/geo_mean/online": dict(
        confidence_level="sequence", confidence="geo_mean", confidence_calibration="online"
    ),
    "token/self_agreement/none": dict(
        confidence_level="token", confidence="self_agreement", confidence_calibration="none"
    ),
    "token/self_agreement/batch": dict(
        confidence_level="token", confidence="self_agreement", confidence_calibration="batch"
    ),
    "token/self_agreement/online": dict(
        confidence_level="token", confidence="self_agreement", confidence_calibration="online"
    ),
    "token/max_prob/none": dict(confidence_level="token", confidence="max_prob", confidence_calibration="none"),
    "token/max_prob/batch": dict(confidence_level="token", confidence="max_prob", confidence_calibration="batch"),
    "token/max_prob/online": dict(confidence_level="token", confidence="max_prob", confidence_calibration="online"),
    "control: r - mean(r)": dict(confidence_level="sequence", confidence="none", confidence_calibration="batch"),
    "GRPO G=4": dict(),
}


def make_pairs(max_operand: int, seed: int = 0) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    pairs = [(a, b) for a in range(max_operand) for b in range(max_operand)]
    random.Random(seed).shuffle(pairs)
    held_out = len(pairs) // 5
    return pairs[held_out:], pairs[:held_out]


def prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def answer(a: int, b: int) -> str:
    return f"<answer>{a + b}</answer>"


def correctness_reward(prompts, completions, **kwargs) -> list[float]:
    out = []
    for p, c in zip(prompts, completions):
        a, b = (int(x) for x in p.rstrip("=").split("+"))
        match = ANSWER.match(c.strip())
        out.append(float(match is not None and int(match.group(1)) == a + b))
    return out


def format_reward(completions, completion_ids=None, eos_token_id=None, **kwargs) -> list[float]:
    """Well-formed answer and stopped by EOS (a measured run lost EOS when it was not rewarded)."""
    ended = (
        [ids[-1] == eos_token_id for ids in completion_ids]
        if completion_ids is not None
        else [True] * len(completions)
    )
    return [float(ANSWER.match(c.strip()) is not None and e) for c, e in zip(completions, ended)]


@torch.no_grad()
def evaluate(
    model, tokenizer, pairs, samples: int = 4, max_new_tokens: int = 12, batch: int = 128, seed: int = 1234
) -> dict:
    """Sampled accuracy (temperature 1), greedy accuracy, format and EOS rates on held-out pairs."""
    torch.manual_seed(seed)
    model.eval()
    stats = {"accuracy": 0.0, "greedy_accuracy": 0.0, "format": 0.0, "eos": 0.0}
    n_sampled = 0
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        enc = tokenizer([prompt(a, b) for a, b in chunk], return_tensors="pt", padding=True)
        for do_sample, reps in ((False, 1), (True, samples)):
            out = model.generate(
                **enc,
                do_sample=do_sample,
                temperature=1.0 if do_sample else None,
                top_k=0 if do_sample else None,
                max_new_tokens=max_new_tokens,
                num_return_sequences=reps,
                pad_token_id=tokenizer.pad_token_id,
            )[:, enc["input_ids"].size(1) :]
            texts = tokenizer.batch_decode(out, skip_special_tokens=True)
            ids = out.tolist()
            prompts_rep = [prompt(a, b) for a, b in chunk for _ in range(reps)]
            correct = correctness_reward(prompts_rep, texts)
            if not do_sample:
                stats["greedy_accuracy"] += sum(correct)
                continue
            n_sampled += len(texts)
            stats["accuracy"] += sum(correct)
            eos = [tokenizer.eos_token_id in row for row in ids]
            stats["eos"] += sum(eos)
            stats["format"] += sum(ANSWER.match(t.strip()) is not None for t in texts)
    stats["greedy_accuracy"] /= len(pairs)
    for key in ("accuracy", "format", "eos"):
        stats[key] /= n_sampled
    model.train()
    return stats


def sft(out_dir: Path, train_pairs, eval_pairs, target: float, max_steps: int, seed: int) -> dict:
    """Supervised warm-up until greedy held-out accuracy reaches `target` (the RL starting point)."""
    model, tokenizer = build_tiny_lm(seed=seed, hidden_size=128, num_layers=2)
    tokenizer.padding_side = "left"
    optim = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.98), weight_decay=0.0)
    rng = random.Random(seed)
    history = []
    progress = tqdm(range(1, max_steps + 1), desc="SFT warm-up")
    for step in progress:
        batch = rng.sample(train_pairs, 64)
        texts = [prompt(a, b) + answer(a, b) + tokenizer.eos_token for a, b in batch]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        for row, (a, b) in enumerate(batch):  # loss on the answer only
            n_prompt = len(tokenizer(prompt(a, b))["input_ids"])
            pad = int((enc["attention_mask"][row] == 0).sum())
            labels[row, : pad + n_prompt] = -100
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad()
        if step % 100 == 0:
            acc = evaluate(model, tokenizer, eval_pairs[:100], samples=1)["greedy_accuracy"]
            history.append((step, acc))
            progress.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
            if acc >= target:
                break
    save_pretrained(model, tokenizer, out_dir)
    return {"steps": step, "history": history}


def evaluate_start(checkpoint: Path, eval_pairs, repeats: int = 5) -> dict:
    """The starting checkpoint scored like one RL run per seed: mean (and standard error) over sampling seeds."""
    model, tokenizer = AutoModelForCausalLM.from_pretrained(checkpoint), AutoTokenizer.from_pretrained(checkpoint)
    runs = [evaluate(model, tokenizer, eval_pairs, seed=seed) for seed in range(repeats)]
    start = {key: statistics.mean(r[key] for r in runs) for key in runs[0]}
    start["accuracy_se"] = statistics.stdev(r["accuracy"] for r in runs) / math.sqrt(repeats)
    return start


def rl_run(name: str, checkpoint: Path, train_pairs, eval_pairs, seed: int, steps: int, lr: float, out: Path) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    eos = tokenizer.eos_token_id

    def fmt(completions, completion_ids=None, **kwargs):
        return format_reward(completions, completion_ids, eos)

    fmt.__name__ = "format"
    dataset = Dataset.from_dict({"prompt": [prompt(a, b) for a, b in train_pairs]})
    common = dict(
        output_dir=str(out / "runs" / re.sub(r"[^a-z0-9]+", "_", name.lower()) / f"seed{seed}"),
        use_cpu=True,
        bf16=False,
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_steps=steps,
        per_device_train_batch_size=16,
        max_completion_length=12,
        temperature=1.0,
        logging_steps=5,
        report_to=[],
        save_strategy="no",
        seed=seed,
        reward_weights=[1.0, 0.1],
        adam_beta2=0.98,
        max_grad_norm=1.0,
        disable_tqdm=True,
    )
    if name.startswith("GRPO"):
        trainer = GRPOTrainer(
            model,
            [correctness_reward, fmt],
            args=GRPOConfig(**common, num_generations=4),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    else:
        args = CGPOConfig(**common, **VARIANTS[name])
        trainer = CGPOTrainer(
            model, [correctness_reward, fmt], args=args, train_dataset=dataset, processing_class=tokenizer
        )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    result = evaluate(model, tokenizer, eval_pairs)
    entropies = [h["entropy"] for h in trainer.state.log_history if "entropy" in h]
    result.update(
        seconds=seconds,
        entropy_ratio=entropies[-1] / entropies[0] if entropies else float("nan"),
        train_reward=[h.get("reward") for h in trainer.state.log_history if "reward" in h],
    )
    return result


def write_report(results: dict, start: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        f"Start (SFT checkpoint, 5 sampling seeds): sampled accuracy {start['accuracy']:.3f} ± "
        f"{start.get('accuracy_se', math.nan):.3f}, greedy {start['greedy_accuracy']:.3f}, "
        f"format {start['format']:.3f}, EOS {start['eos']:.3f}",
        "",
        "| advantage | runs | sampled acc (mean ± s.e.) | greedy acc | format | EOS | entropy end/start | s/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fig, ax = plt.subplots(figsize=(9, 5))

    def agg(runs: list[dict], key: str) -> tuple[float, float]:
        vals = [r[key] for r in runs]
        sem = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else float("nan")
        return statistics.mean(vals), sem

    for index, (name, runs) in enumerate(results.items()):
        acc, sem = agg(runs, "accuracy")
        lines.append(
            f"| {name} | {len(runs)} | {acc:.3f} ± {sem:.3f} | {agg(runs, 'greedy_accuracy')[0]:.3f} | "
            f"{agg(runs, 'format')[0]:.3f} | {agg(runs, 'eos')[0]:.3f} | {agg(runs, 'entropy_ratio')[0]:.2f} | "
            f"{agg(runs, 'seconds')[0]:.0f} |"
        )
        curve = [sum(vals) / len(vals) for vals in zip(*[r["train_reward"] for r in runs])]
        ax.plot(
            [5 * (i + 1) for i in range(len(curve))],
            curve,
            label=name,
            color=plt.cm.tab20(index),
            linestyle="--" if name.startswith(("GRPO", "control")) else "-",
        )
    ax.set_xlabel("RL step")
    ax.set_ylabel("train reward (weighted, logged by TRL)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "text_variants.png", dpi=120)
    (out / "text_variants.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/bench/text_variants")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rl_steps", type=int, default=120)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--max_operand", type=int, default=30)
    parser.add_argument("--sft_target", type=float, default=0.5)
    parser.add_argument("--sft_max_steps", type=int, default=6000)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_pairs, eval_pairs = make_pairs(args.max_operand)
    checkpoint = out / "sft"
    if not (checkpoint / "config.json").exists():
        info = sft(checkpoint, train_pairs, eval_pairs, args.sft_target, args.sft_max_steps, seed=0)
        (out / "sft.json").write_text(json.dumps(info))
    start = evaluate_start(checkpoint, eval_pairs)
    results_path = out / "text_variants.json"
    results = json.loads(results_path.read_text())["runs"] if results_path.exists() else {}
    for seed in range(args.seeds):  # seeds outermost: a partial run still compares every variant
        for name in tqdm(args.variants, desc=f"seed {seed}"):
            if len(results.get(name, [])) > seed:
                continue
            results.setdefault(name, []).append(
                rl_run(name, checkpoint, train_pairs, eval_pairs, seed, args.rl_steps, args.lr, out)
            )
            results_path.write_text(json.dumps({"start": start, "args": vars(args), "runs": results}, indent=1))
    write_report(results, start, out)


if __name__ == "__main__":
    main()
