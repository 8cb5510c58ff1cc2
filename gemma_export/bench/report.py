"""The benchmark's result as a table (absolute figures, then ours / each engine) and the goals of
issue 6, each a ratio measured in this one run. Pure functions over the result dict."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 2**20


@dataclass(frozen=True)
class Goal:
    label: str
    metric: str  # "prefill_tps" | "decode_tps" | "fraction_of_bound"
    other: str | None  # engine ours is compared with; None: ours' own figure
    target: float


# Issue 6 (Gemma 3 270M, int4 export): ours against the others on the same machine, same run.
GOALS = (
    Goal("decode ours / ort-genai int4", "decode_tps", "genai", 1.25),
    Goal("prefill ours / ort-genai int4", "prefill_tps", "genai", 2.0),
    Goal("prefill ours / eager fp32", "prefill_tps", "eager", 1.0),
    Goal("prefill ours / llama.cpp", "prefill_tps", "llama", 1.0),
    Goal("decode ours / bandwidth bound", "fraction_of_bound", None, 0.5),
)


def _run(engine: dict, prompt_tokens: int) -> dict | None:
    if engine["status"] != "ok":
        return None
    return next((r for r in engine["runs"] if r["prompt_tokens"] == prompt_tokens), None)


def ratio(engines: dict, metric: str, other: str, prompt_tokens: int) -> float | None:
    """ours' figure / the other engine's, for one prompt length (None when either did not run)."""
    a, b = _run(engines["ours"], prompt_tokens), _run(engines.get(other, {"status": "absent"}), prompt_tokens)
    if a is None or b is None or not b[metric]:
        return None
    return a[metric] / b[metric]


def goal_results(engines: dict, prompt_tokens: list[int]) -> list[dict]:
    out = []
    for g in GOALS:
        for n in prompt_tokens:
            if g.other is None:
                run = _run(engines["ours"], n)
                value = run[g.metric] if run else None
            else:
                value = ratio(engines, g.metric, g.other, n)
            out.append({"goal": g.label, "prompt_tokens": n, "value": value, "target": g.target,
                        "met": None if value is None else value >= g.target})
    return out


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(result: dict) -> str:
    engines = result["engines"]
    names = [n for n in engines if engines[n]["status"] == "ok"]
    prompts = result["settings"]["prompt_tokens"]
    new = result["settings"]["new_tokens"]
    width = 12
    lines = [f"{'':34}" + "".join(f"{engines[n]['label']:>{width}}" for n in names)]

    def row(label: str, values: list, fmt: str) -> None:
        lines.append(f"{label:34}" + "".join(f"{_cell(v, fmt):>{width}}" for v in values))

    def per_run(key: str, n: int, scale: float = 1.0) -> list:
        return [None if _run(engines[e], n) is None else _run(engines[e], n)[key] * scale for e in names]

    for n in prompts:
        row(f"time to first token s ({n})", per_run("ttft_s", n), ".3f")
        row(f"prefill tokens/s ({n})", per_run("prefill_tps", n), ".1f")
    for n in prompts:
        row(f"decode tokens/s ({new} new after {n})", per_run("decode_tps", n), ".1f")
        row(f"  new tokens made", per_run("new_tokens", n), ".0f")
        row(f"  bound tokens/s (bandwidth)", per_run("bound_tps", n), ".1f")
        row(f"  decode / bound", per_run("fraction_of_bound", n), ".1%")
        row(f"  first ids agreeing with ours", per_run("agree_with_ours", n), ".0f")
    row("weights read per token MiB", [engines[e]["weight_bytes_per_token"] / MIB for e in names], ".1f")
    row(f"KV read per token MiB (after {prompts[-1]})", per_run("kv_bytes_per_token", prompts[-1], 1 / MIB), ".2f")
    row("peak RSS MiB", [engines[e]["peak_rss"] / MIB for e in names], ".0f")
    row("load s", [engines[e]["load_s"] for e in names], ".2f")
    others = [n for n in names if n != "ours"]
    if others:
        lines += ["", f"{'ours / engine (same run)':34}" + "".join(f"{engines[n]['label']:>{width}}" for n in others)]
        for n in prompts:
            lines.append(f"{f'prefill tokens/s ({n})':34}" + "".join(
                f"{_cell(ratio(engines, 'prefill_tps', o, n), '.2f'):>{width}}" for o in others))
        for n in prompts:
            lines.append(f"{f'decode tokens/s (after {n})':34}" + "".join(
                f"{_cell(ratio(engines, 'decode_tps', o, n), '.2f'):>{width}}" for o in others))
        lines.append(f"{'peak RSS':34}" + "".join(
            f"{engines['ours']['peak_rss'] / engines[o]['peak_rss']:>{width}.2f}" for o in others))
    skipped = [f"  {engines[n]['label']}: {engines[n]['status']}: {engines[n]['note']}"
               for n in engines if engines[n]["status"] != "ok"]
    if skipped:
        lines += ["", "not measured:", *skipped]
    lines += ["", "goals (issue 6, Gemma 3 270M int4; ratios from this run):"]
    for g in result["goals"]:
        met = {True: "met", False: "NOT met", None: "n/a (engine not measured)"}[g["met"]]
        lines.append(f"  {g['goal']:32} ({g['prompt_tokens']:>4}) {_cell(g['value'], '.2f'):>6} "
                     f"(target >= {g['target']:.2f})  {met}")
    return "\n".join(lines)


def format_header(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    cache = f", last-level cache {m['cache_bytes'] / MIB:.0f} MiB" if m["cache_bytes"] else ""
    rounds = f" in each of {s['rounds']} rounds, engines taking turns" if s.get("rounds", 1) > 1 else ""
    return (f"export {s['export']} ({s['family']}, {s['quant']}); prompt tokens {', '.join(map(str, s['prompt_tokens']))} "
            f"(BOS + CPython docs text), {s['new_tokens']} new tokens greedy, {s['threads']} threads, "
            f"best of {s['repeat']}{rounds}\nread bandwidth {m['read_bandwidth'] / 1e9:.2f} GB/s "
            f"({s['threads']} threads, numpy sum over {m['bandwidth_buffer_bytes'] / MIB:.0f} MiB{cache}); "
            f"{m['cpu']}, {m['cores']} cores")
