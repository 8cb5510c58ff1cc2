"""Runtime memory for text-only and multimodal prompts on one export (a benchmark, not a test).

    python bench/multimodal_rss.py OUT --image PHOTO --audio SPEECH.wav [--threads 2]

One process per order of prompts, each a fresh Model.load: the resident set (VmRSS) and its peak
(VmHWM) after loading, after a text-only chat turn, after a turn with the audio clip, and after a
turn with the image (the encoders load when first needed, so a text-only conversation never pays
for them). Each order runs twice: encoder sessions as the runtime opens them
(session_cache.open_encoder_session: EXTENDED optimizations, no CPU arena) and as decoder sessions
are opened (ALL optimizations, arena on), for a before/after in one run. Prints one JSON line per
process; MiB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))


def _status() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) >> 10  # kB -> MiB
    return fields


def _child(out: str, image: str, audio: str, threads: int | None, order: list[str], sessions: str) -> None:
    from gemma_runtime import Model, session_cache

    if sessions == "default":  # encoder sessions with the decoder's options
        session_cache.open_encoder_session = lambda path, provider, threads: session_cache.open_session(
            path, provider, threads)[0]

    figures = {"start": _status()}
    t = time.perf_counter()
    model = Model.load(out, threads=threads)
    figures["loaded"] = {**_status(), "s": round(time.perf_counter() - t, 1)}
    for step in order:
        parts = {"text": [], "audio": [{"type": "audio", "audio": audio}], "image": [{"type": "image", "image": image}]}[step]
        t = time.perf_counter()
        model.chat([{"role": "user", "content": [*parts, {"type": "text", "text": "Describe it."}]}], max_new_tokens=4,
                   temperature=0)
        figures[f"after_{step}"] = {**_status(), "s": round(time.perf_counter() - t, 1),
                                    "encoders": list(model.loaded_encoders)}
    print(json.dumps({"export": out, "encoder_sessions": sessions, "order": order, **figures}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--image", required=True)
    ap.add_argument("--audio", required=True)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sessions", default="runtime", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.out, args.image, args.audio, args.threads, args.child.split(","), args.sessions)
        return
    runs = [("text", "runtime"), ("text,audio,image", "runtime"), ("text,audio,image", "default")]
    for order, sessions in runs:
        cmd = [sys.executable, __file__, args.out, "--image", args.image, "--audio", args.audio, "--child", order,
               "--sessions", sessions]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
