"""Full-size export with random weights (e.g. E2B), for a machine with the memory for it: export
time and peak RSS, the runtime's peak RSS, prefill/decode speed of our runtime against eager
transformers loaded with the same random weights (same thread count, one run), and how the two
agree: fp32 exports against the parity budget, quantized ones as greedy top-1 agreement.

    python bench/full_size_random.py --variant e2b --quant int4 --work /tmp/full [--threads 4]
        [--prompt-tokens 128] [--steps 32] [--reuse] [--rtn] [--cold]

Measured 2026-12-01 on the lent 16-core machine (E2B-shaped random weights, --rtn, --threads 4, a
128-token prompt + 32 greedy steps, max context 4096):
    export 271 s, peak RSS 4.05 GiB, 4.53 GiB on disk (with the scale search: 497 s, 4.19 GiB);
    decode: ours 10.14 tokens/s, eager transformers fp32 3.16 (3.21x); prefill 64.0 vs 56.9 (1.13x);
    peak RSS: ours 3.36 GiB (after load 2.79: 2.48 anonymous, the prepacked weights; 0.31 mapped),
    eager 42.1 GiB. Greedy agreement is not meaningful on random weights (near-flat logits).
On this 2-core machine (--threads 2): ours 8.07-8.96 decode tokens/s (2.15 GiB of weights a step:
53% of the 15.3 tokens/s that 35.3 GB/s allows). Peak RSS 3.28 GiB right after load before the LM
head was cut into 128 MiB parts (passes/matmuls.py), 2.85 after; 3.35 after 32 decode steps.

Rerun 2026-12-01 on the lent machine after the int4 block sums became Reshape + ReduceSum for
K = 8192 (passes/matmuls.py; the 0/1 constant was read 30 times a step): decode ours 13.00 tokens/s,
eager 3.79 (3.43x); prefill 75.7 vs 72.7 (1.04x); peak RSS ours 3.35 GiB (after load 2.79: 2.49
anonymous; after prefill 3.18; after 32 steps 3.32), eager 42.1 GiB. The two runs' eager figures
differ by 20%: compare the ratios within a run.

Rerun 2026-12-01 (a later lease, slower: eager decoded 2.76) with the int4 recipe's attention in
int8 and its LM head in int8 blocks of 128 (recipes.int4): export 228 s, peak RSS 3.92 GiB, 4.56 GiB
on disk; decode ours 9.89 tokens/s, eager 2.76 (3.58x); prefill 67.1 vs 48.4 (1.39x); peak RSS ours
3.30 GiB (after load 2.78: 2.47 anonymous), eager 42.1 GiB. With `--lm-head 4` (the 4-bit head
rescored, passes/rescore.py) on another lease: decode 9.86 vs eager 3.33 (2.96x), peak RSS 3.60
GiB (the int8 rows are mapped from the data file, and the pages that the gathers touch stay).

Rerun 2026-12-02 on this 2-core machine (--threads 2 --steps 16, our runtime only: eager E2B needs
42 GiB): export 195 s, peak RSS 3.86 GiB. Our runtime's peak RSS 3.26 GiB before the host tables
were advised MADV_RANDOM (runtime/gemma_runtime/tables.py: the per-layer table's resident pages
after 144 random ids 114 MiB), 3.14 after; 3.06 with --cold. With the int4 recipe's `other`
weights in int8 (recipes.int4): export 213 s, 3.81 GiB; runtime peak 3.03 GiB, 2.86 with --cold
(after load 2.58: 2.30 anonymous), decode 11.1-12.4 tokens/s against 10.0-10.2 before. What the
2.86 GiB holds: onnxruntime's prepacked MatMulNBits weights (MLP 4-bit with scales and block sums
~1.05 GiB, the int8 LM head 0.56, attention 0.34, `other` ~0.1), the affine MLP offsets (0.18 GiB
float, mapped from decoder.data and prepacked again), the KV cache (96 MiB), the prefill's
activations (~0.2 GiB at the peak).

Rerun 2026-12-02 on this 2-core machine (--threads 2 --steps 16 --cold, run back to back, our
runtime only) with `--lm-head 4` (`gemma-export --variant e2b --random-weights --quant int4 --lm-head 4
--rtn`: a 4-bit head of blocks of 64 whose 512 best candidates are rescored from the int8 rows of
embed_tokens.bin, bound as graph inputs over the table's memory map): export 261 s, 4.11 GiB on
disk (4.36 with the int8 head); peak RSS 2.64 GiB (after load 2.41: 2.05 anonymous; after prefill
2.58; after 16 steps 2.62, of which 29 MiB of the token table's pages that the rescoring touched,
random weights picking new candidates every step) against 3.04 GiB for the int8-head export in the
same session. A run right after the export read 3.23 GiB: the export's dirty pages were still
being written back, the eviction kept them, and the mappings took large folios (0.83 GiB file-
backed after prefill); run `sync` first. MLP blocks of 64 would save ~0.27 GiB more, but on the
270M they cost too much (`--block-size 64`: 87.3% / KL 0.062 / ppl ratio 1.074 against 91.1% /
0.033 / 1.028 for blocks of 32, first 2048 tokens).

Rerun 2026-12-07 on this 2-core machine (AMD EPYC) with the 4-bit head in blocks of 128
(recipes.LM_HEAD4_BLOCK): `gemma-export --variant e2b --random-weights --quant int4 --lm-head 4 --rtn
/work/full/e2b-int4`: export 212 s, peak RSS 4.14 GiB, 4202 MiB on disk; then `python
bench/full_size_random.py --work /work/full --role ours --threads 2 --prompt-tokens 4064 --steps 16
--cold` (our runtime only): peak RSS 2.30 GiB at 4080 positions (after load 2.07: 2.01 anonymous;
after prefill 2.27), prefill 79.8 tokens/s, decode 8.29 tokens/s at that context.

Each of export, our runtime and eager transformers runs in a process of its own, so each peak RSS
is that process's own (VmHWM; ru_maxrss would carry the parent's peak over fork and exec).
Not a test: eager E2B in fp32 needs ~22 GB of memory, and an fp32 export ~20 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from gemma_export.bench.engines._child import peak_rss

GIB = 1 << 30


def _memory() -> dict[str, float]:
    """GiB: peak RSS (VmHWM), RSS now, and its anonymous / file-backed parts (file-backed pages are
    memory-mapped weights and tables, which the kernel may drop and re-read under pressure)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = round(int(value.split()[0]) * 1024 / GIB, 3)
    return fields


def _peak_rss() -> float:
    return round(peak_rss() / GIB, 2)


def _export(args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "gemma_export.cli", "--variant", args.variant, "--random-weights",
           "--quant", args.quant, "--max-context", str(args.max_context), "--quiet", str(out)]
    if args.rtn:
        cmd.insert(-1, "--rtn")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"export failed: {' '.join(cmd)}")
    return {"export_s": round(time.perf_counter() - start, 1), "export_peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 2),
            "out_gib": round(sum(f.stat().st_size for f in out.iterdir()) / GIB, 2)}


def _prompt(args) -> list[int]:
    return [2] + np.random.default_rng(0).integers(10, 20000, args.prompt_tokens - 1).tolist()


def _child(args, role: str, out: Path) -> dict:
    """Run this script as `role` in a fresh process; it prints one JSON line and saves logits."""
    cmd = [sys.executable, __file__, "--role", role, "--variant", args.variant, "--work", str(args.work),
           "--quant", args.quant, "--prompt-tokens", str(args.prompt_tokens), "--steps", str(args.steps),
           "--threads", str(args.threads)] + (["--cold"] if args.cold else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{role} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _evict(folder: Path) -> None:
    """Drop the folder's files from the page cache (as on a device that has just received them):
    right after an export the kernel holds them in large folios, and a memory-mapped table then
    maps a whole folio around every row it reads, which counts in the resident set."""
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _ours(args, out: Path) -> dict:
    """Teacher-forced: prefill the prompt, then `steps` greedy steps; logits saved for agreement."""
    from gemma_runtime import Model

    if args.cold:
        _evict(out)
    start = time.perf_counter()
    model = Model.load(out, threads=args.threads)
    load_s = time.perf_counter() - start
    memory = {"after_load": _memory()}
    prompt = _prompt(args)
    model._cache.reset()
    chunk = model.manifest.prefill_chunk
    start = time.perf_counter()
    for first in range(0, len(prompt), chunk):
        logits = model._step(np.asarray(prompt[first:first + chunk]), first, chunk)
    prefill_s = time.perf_counter() - start
    memory["after_prefill"] = _memory()
    rows, tokens = [logits.copy()], []
    start = time.perf_counter()
    for i in range(args.steps):
        tokens.append(int(rows[-1].argmax()))
        rows.append(model._step(np.asarray(tokens[-1:]), len(prompt) + i, 1).copy())
    decode_s = time.perf_counter() - start
    memory["after_decode"] = _memory()
    np.save(args.work / "ours_logits.npy", np.concatenate(rows))
    return {"load_s": round(load_s, 1), "prefill_tps": round(len(prompt) / prefill_s, 2),
            "decode_tps": round(args.steps / decode_s, 3), "peak_rss_gib": _peak_rss(), "memory_gib": memory,
            "tokens": tokens}


def _eager(args, out: Path) -> dict:
    """The same random weights in transformers (fp32, eager attention, its own KV cache): the
    teacher-forced logits on our greedy tokens in one forward, then its own prefill + decode timed."""
    import torch
    import transformers

    from gemma_export.variants import named_variant, variant_from_config
    from gemma_export.weights import RandomTensors

    torch.set_num_threads(args.threads)
    config = named_variant(args.variant).config
    variant = variant_from_config(config, expected=args.variant)
    cls = getattr(transformers, config["architectures"][0])
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    hf_config._attn_implementation = "eager"
    start = time.perf_counter()
    ref = cls(hf_config)  # random init, overwritten below (meta would leave rope buffers empty)
    tensors = RandomTensors(variant)
    missing, unexpected = ref.load_state_dict({n: tensors.get(n) for n in tensors.names()}, strict=False)
    ref.tie_weights()
    ref.eval()
    load_s = time.perf_counter() - start
    prompt = _prompt(args)
    tokens = json.loads((args.work / "ours_tokens.json").read_text())
    with torch.no_grad():
        forced = ref(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:].float().numpy()
        np.save(args.work / "eager_logits.npy", forced)
        start = time.perf_counter()
        step = ref(torch.tensor([prompt]), use_cache=True)
        prefill_s = time.perf_counter() - start
        past, token = step.past_key_values, step.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(args.steps):
            step = ref(token, past_key_values=past, use_cache=True)
            past, token = step.past_key_values, step.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - start
    return {"load_s": round(load_s, 1), "prefill_tps": round(len(prompt) / prefill_s, 2),
            "decode_tps": round(args.steps / decode_s, 3), "peak_rss_gib": _peak_rss(),
            "missing": list(missing), "unexpected": list(unexpected)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="e2b")
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--work", type=Path, default=Path("/tmp/full"))
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--reuse", action="store_true", help="use the export already in --work")
    ap.add_argument("--rtn", action="store_true", help="export with plain round-to-nearest scales: the same files, "
                    "graph and speed, minutes faster (random weights gain nothing from the scale search)")
    ap.add_argument("--cold", action="store_true", help="evict the export's files from the page cache before our "
                    "runtime loads it (a device that has just received the folder)")
    ap.add_argument("--role", choices=("ours", "eager"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = args.work / f"{args.variant}-{args.quant}"
    if args.role:
        print(json.dumps((_ours if args.role == "ours" else _eager)(args, out)), flush=True)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    report = {"variant": args.variant, "quant": args.quant, "threads": args.threads,
              "prompt_tokens": args.prompt_tokens, "steps": args.steps, "cores": os.cpu_count()}
    if not (args.reuse and (out / "manifest.json").is_file()):
        report["export"] = _export(args, out)
        print(json.dumps(report), flush=True)
    report["ours"] = _child(args, "ours", out)
    (args.work / "ours_tokens.json").write_text(json.dumps(report["ours"].pop("tokens")))
    print(json.dumps(report), flush=True)
    report["eager"] = _child(args, "eager", out)
    ours, ref = np.load(args.work / "ours_logits.npy"), np.load(args.work / "eager_logits.npy")
    report["decode_ratio"] = round(report["ours"]["decode_tps"] / report["eager"]["decode_tps"], 2)
    report["prefill_ratio"] = round(report["ours"]["prefill_tps"] / report["eager"]["prefill_tps"], 2)
    report["top1_agreement"] = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    report["max_abs_diff"] = float(np.abs(ours - ref).max())
    report["parity_budget"] = 1e-4 * max(1.0, float(np.abs(ref).max()))
    print(json.dumps(report, indent=1), flush=True)


if __name__ == "__main__":
    main()
