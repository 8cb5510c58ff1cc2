"""Runtime memory for text-only and multimodal prompts on one export (a benchmark, not a test).

    python bench/multimodal_rss.py OUT --image PHOTO --audio SPEECH.wav [--threads 2]

One process per order of prompts, each a fresh Model.load: the resident set (VmRSS) and its peak
(VmHWM) after loading, after a text-only chat turn, after a turn with the audio clip, and after a
turn with the image (the encoders load when first needed, so a text-only conversation never pays
for them). Each order runs twice: encoder sessions as the runtime opens them
(session_cache.open_encoder_session: EXTENDED optimizations, no CPU arena) and as decoder sessions
are opened (ALL optimizations, arena on), for a before/after in one run. Prints one JSON line per
process; MiB.

Measured 2026-12-01 on this shared 2-core machine (24 GB), --threads 2, on exports of
bench/full_encoders_checkpoint.py (full-size MobileNetV5 vision + USM audio towers, random weights;
a 4-layer decoder at E2B's hidden size 2048 with the tiny test vocabulary of 512, so the decoder
side is far below E2B's), a 640x480 JPEG and a 5 s WAV written with pillow / soundfile:

    python bench/full_encoders_checkpoint.py /work/cache/mm-fullenc-hf
    gemma-export --checkpoint /work/cache/mm-fullenc-hf --quant int8 /work/cache/mm-fullenc-int8
    gemma-export --checkpoint /work/cache/mm-fullenc-hf /work/cache/mm-fullenc-fp32
    python bench/multimodal_rss.py /work/cache/mm-fullenc-int8 --image photo.jpg --audio speech.wav --threads 2

VmRSS / VmHWM, MiB (order text, audio, image; the text-only process agrees within 5 MiB):
  int8 (1502 MiB on disk), runtime encoder sessions: loaded 191 / 198; after text 552 / 616;
    after audio 1389 / 1453; after image 2457 / 2951
  int8, encoder sessions opened like the decoder's: after text 540 / 604; after audio 1640 / 1703;
    after image 3362 / 3426
  fp32 (4805 MiB), runtime encoder sessions: loaded 1107 / 1114; after text 1145 / 1145;
    after audio 3842 / 3886; after image 5010 / 5166
  fp32, encoder sessions opened like the decoder's: after text 1145 / 1145; after audio 4023 / 4023;
    after image 6295 / 6295
(int8 with session_cache as of cbf3dd8, no memory patterns; the fp32 runs started just before it:
int8 before it gave after audio 1443 / 1507, after image 2637 / 2954.) So a text-only conversation
never pays for the encoders; the audio encoder adds ~0.8 GiB (int8) / ~2.6 GiB (fp32), the vision
encoder ~1.0 GiB / ~1.1 GiB more; the runtime's encoder session options save 0.9 GiB (int8) /
1.3 GiB (fp32) against the decoder's at the end. (int8 loads lazily: most of its decoder's resident
set appears at the first turn; fp32's at load. The int8 vision encoder costs about as much as the
fp32 one although its file is a quarter: its Conv kernels are dequantized to float on every run.)
Turn times, int8 on a quiet moment: text 2.5 s, audio 11.8 s, image 10.7 s (4 new tokens each).
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
