"""Plot the cluster-mode benchmark (``bench/dist_bench.py``'s JSON) for docs/benchmarks.md.

``PYTHONPATH=. .venv/bin/python -m bench.plot_cluster bench-out/cluster.json docs/cluster-bench.png``
(matplotlib comes with the ``bench`` extra: ``pip install -e '.[bench]'``).

Left: median wall time of the embedded run and of the queued run at the same total concurrency (transfer
slots). Right: Redis commands per blob of each queued run, against the issue's limit of 30.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    embedded = {r["parallel"]: r for r in results if r["kind"] == "embedded"}
    queued = {r["workers"] * r["concurrency"]: r for r in results if r["kind"] != "embedded"}
    slots = sorted(set(embedded) & set(queued))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.38
    xs = range(len(slots))
    e = [embedded[s]["median_wall_s"] for s in slots]
    q = [queued[s]["median_wall_s"] for s in slots]
    bars_e = left.bar([x - width / 2 for x in xs], e, width, label="embedded (one process)")
    bars_q = left.bar([x + width / 2 for x in xs], q, width, label="queued (Celery workers x 4 threads)")
    left.bar_label(bars_e, fmt="%.1f", fontsize=8)
    left.bar_label(bars_q, labels=[f"{v:.1f} ({v / w:.2f}x)" for v, w in zip(q, e, strict=True)], fontsize=8)
    left.set_xticks(list(xs), [f"{s} slots\n({queued[s]['workers']} worker{'s' if queued[s]['workers'] > 1 else ''})"
                               for s in slots])  # fmt: skip
    left.set_ylabel("wall seconds, median (lower is better)")
    left.set_title("16 images, 256 MiB, over a 20 ms / 160 Mbit/s link", fontsize=10)
    left.legend(fontsize=8)
    labels = [r["config"] for r in results if r["kind"] != "embedded"]
    cmds = [r["median_redis_commands_per_blob"] for r in results if r["kind"] != "embedded"]
    bars = right.barh(labels, cmds, color="tab:orange")
    right.bar_label(bars, fmt="%.1f", fontsize=8)
    right.axvline(30, color="black", linestyle="--", linewidth=1)
    right.text(30, -0.6, " limit 30", fontsize=8, va="bottom")
    right.set_xlabel("Redis commands per blob (everything Redis served during the run)")
    right.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m bench.plot_cluster CLUSTER.json OUT.png", file=sys.stderr)
        return 2
    plot(json.loads(Path(args[0]).read_text()), Path(args[1]))
    print(f"plot: {args[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
