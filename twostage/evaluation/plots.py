"""PNG plots for eval sweeps and load tests (matplotlib, headless)."""

from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: install 'twostage[plots]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_eval(report: dict, path: Path) -> None:
    """Quality against latency over recall_k, and quality against the fusion weight (whichever were swept)."""
    plt = _pyplot()
    sweep, alphas = report.get("sweep_recall_k", {}), report.get("sweep_alpha", {})
    panels = [name for name, data in (("recall_k", sweep), ("alpha", alphas)) if data] or ["recall_k"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        if panel == "recall_k":
            ks = list(sweep)
            x = [sweep[k]["mean_latency_ms"] for k in ks]
            y = [sweep[k]["final_ndcg@10"] for k in ks]
            axis.plot(x, y, "o-")
            for k, xi, yi in zip(ks, x, y):
                axis.annotate(f"recall_k={k}", (xi, yi), textcoords="offset points", xytext=(5, -12))
            axis.set(xlabel="mean latency (ms)", ylabel="nDCG@10 (final)", title="recall_k: quality against latency")
        else:
            axis.plot([float(a) for a in alphas], list(alphas.values()), "o-")
            axis.set(xlabel="fusion weight on rerank (alpha)", ylabel="nDCG@10", title="linear fusion weight")
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_load(times_s: list[float], latencies_ms: list[float], path: Path, title: str) -> None:
    """Latency over the run, and its distribution (CDF)."""
    import numpy as np

    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(times_s, latencies_ms, ".", markersize=3)
    left.set(xlabel="time since start (s)", ylabel="latency (ms)", title=title)
    left.grid(alpha=0.3)
    ordered = np.sort(latencies_ms)
    right.plot(ordered, np.arange(1, len(ordered) + 1) / max(len(ordered), 1))
    right.set(xlabel="latency (ms)", ylabel="share of requests", title="latency CDF")
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_steps(steps: list[dict], slo_p99_ms: float, path: Path, title: str) -> None:
    """Step mode: achieved rate and p99 against the offered rate, with the SLO line."""
    plt = _pyplot()
    offered = [s["offered_rps"] for s in steps]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(offered, [s["achieved_rps"] for s in steps], "o-", label="achieved")
    left.plot(offered, offered, ":", color="grey", label="offered")
    left.set(xlabel="offered (requests/s)", ylabel="answered (requests/s)", title=title)
    left.legend()
    right.plot(offered, [s["p99_ms"] or 0 for s in steps], "o-")
    right.axhline(slo_p99_ms, color="red", linestyle="--", label=f"SLO p99 {slo_p99_ms:g} ms")
    right.set(xlabel="offered (requests/s)", ylabel="p99 latency (ms)", title="p99 by step")
    right.legend()
    for axis in (left, right):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
