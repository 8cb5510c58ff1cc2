"""The benchmark's result as one PNG: prefill and decode tokens/s per engine and prompt length
(decode with each engine's bandwidth bound drawn over its bar), and peak RSS."""

from __future__ import annotations

from pathlib import Path

from ..errors import ExportError


def require_matplotlib() -> None:
    """Checked before any engine runs, so a missing plotting library does not cost a run."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ExportError("--plot needs matplotlib: pip install 'gemma-export[bench]' (or pip install matplotlib)") from None


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = {n: e for n, e in result["engines"].items() if e["status"] == "ok"}
    prompts = result["settings"]["prompt_tokens"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    width = 0.8 / max(len(engines), 1)
    for panel, (metric, title) in enumerate([("prefill_tps", "prefill tokens/s"),
                                             ("decode_tps", f"decode tokens/s ({result['settings']['new_tokens']} new)")]):
        ax = axes[panel]
        for i, (name, e) in enumerate(engines.items()):
            runs = {r["prompt_tokens"]: r for r in e["runs"]}
            xs = [p + (i - (len(engines) - 1) / 2) * width for p in range(len(prompts))]
            ax.bar(xs, [runs[n][metric] for n in prompts], width, label=e["label"])
            if metric == "decode_tps":
                ax.scatter(xs, [runs[n]["bound_tps"] for n in prompts], marker="_", s=300, color="black",
                           label="bandwidth bound" if i == 0 else None)
        ax.set_xticks(range(len(prompts)), [f"{n}-token prompt" for n in prompts])
        ax.set_title(title)
        ax.legend(fontsize=8)
    ax = axes[2]
    ax.bar([e["label"] for e in engines.values()], [e["peak_rss"] / 2**20 for e in engines.values()],
           color=[f"C{i}" for i in range(len(engines))])  # the same colour per engine as the other panels
    ax.set_title("peak RSS MiB")
    s, m = result["settings"], result["machine"]
    fig.suptitle(f"{s['family']} {s['quant']}: {s['threads']} threads, read bandwidth {m['read_bandwidth'] / 1e9:.1f} GB/s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
