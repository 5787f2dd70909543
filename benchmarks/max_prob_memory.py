"""Peak memory of the `max_prob` baseline's LM-head projection at Qwen2.5-VL's vocabulary (151,936), on CPU.

`max_prob` needs `max_v p(v | y<t)` at every completion position, which TRL's fused LM head does not return, so
CGPO projects the completion positions' hidden states through the head once more (no grad). Materialising those
logits at once costs N x V x 4 bytes; CGPO chunks them by bytes (`cgpo_trl.trainer.MAX_PROB_CHUNK_BYTES`). This
script measures, in a fresh process per setting, the extra peak resident memory of one projection of N positions
(`ru_maxrss` after the call minus before it), for the byte-bounded chunk and for the 4096-row chunk used before.

    python benchmarks/max_prob_memory.py --out benchmarks/results/max_prob_memory
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

VOCAB = 151_936
SETTINGS = {
    "bytes (64 MiB)": None,
    "4096 rows (before)": 4096 * VOCAB * 4,
}


def measure(hidden_size: int, positions: int, chunk_bytes: int | None) -> dict:
    import torch

    from cgpo_trl.trainer import MAX_PROB_CHUNK_BYTES, max_logprob

    torch.manual_seed(0)
    weight = torch.empty(VOCAB, hidden_size).normal_(0.0, 0.02)  # in place: no temporary raises the peak
    hidden = torch.empty(positions, hidden_size).normal_()
    max_logprob(hidden[:2], weight, None)  # warm up the allocator and kernels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out = max_logprob(hidden, weight, None, chunk_bytes=chunk_bytes)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    chunk = MAX_PROB_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    return {
        "extra_peak_mib": (peak - before) / 1024,
        "rows_per_chunk": max(1, chunk // (4 * VOCAB)),
        "logits_if_unchunked_mib": positions * VOCAB * 4 / 2**20,
        "seconds": seconds,
        "finite": bool(out.isfinite().all()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/bench/max_prob_memory")
    parser.add_argument("--hidden_size", type=int, default=896, help="Qwen2.5-0.5B's; 3584 for the 7B")
    parser.add_argument("--positions", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        hidden, positions, chunk = args.child
        print(json.dumps(measure(int(hidden), int(positions), None if chunk == "default" else int(chunk))))
        return
    rows = []
    for positions in args.positions:
        for name, chunk in SETTINGS.items():
            cmd = [sys.executable, __file__, "--child", str(args.hidden_size), str(positions), str(chunk or "default")]
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            rows.append({"positions": positions, "chunking": name, "hidden_size": args.hidden_size, **result})
            print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"vocab": VOCAB, "rows": rows}, indent=1))
    lines = [
        f"vocabulary {VOCAB}, hidden size {args.hidden_size}, fp32 on CPU, one fresh process per row",
        "",
        "| positions | chunking | rows per chunk | extra peak (MiB) | unchunked logits (MiB) | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['positions']} | {r['chunking']} | {r['rows_per_chunk']} | {r['extra_peak_mib']:.0f} | "
            f"{r['logits_if_unchunked_mib']:.0f} | {r['seconds']:.2f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
