"""Time to first token of chat turn 5, with and without KV reuse (a benchmark, not a test).

    python bench/chat_reuse.py OUT [--threads N] [--new-tokens 32]

Runs a 5-turn conversation with reuse (the default of Model.chat), then replays turn 5's full
conversation from scratch (reuse_cache=False), and prints both, with the answers' equality.

Measured 2026-12-01 (gemma3-270m fp32 export, /work/cache/real270m-fp32: max context 4096, chunk 128;
--threads 2, onnxruntime 1.32.0, a shared 2-core machine at load average 6.5-7.7, so wall times are
inflated; 51 s in all):

    turn 1: prompt 15 tokens, reused 1, ttft 320 ms
    turn 2: prompt 64 tokens, reused 46, ttft 375 ms
    turn 3: prompt 114 tokens, reused 95, ttft 355 ms
    turn 4: prompt 164 tokens, reused 145, ttft 401 ms
    turn 5: prompt 214 tokens, reused 195, ttft 494 ms
    turn 5 time to first token: 494 ms with reuse (19 of 214 tokens prefilled), 3026 ms without
    (214 prefilled); answers equal: True

(turn 1 reuses the BOS row left by the warm-up call.)
"""

from __future__ import annotations

import argparse

from gemma_runtime import Model

TURNS = [
    "Hello! Who are you?",
    "What is the capital of France?",
    "한국의 수도는 어디인가요?",
    "Write a short poem about the sea.",
    "Thank you. Summarize our conversation.",
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    model = Model.load(args.out, threads=args.threads)
    model.generate("warm up", max_new_tokens=2)
    messages, answer = [], None
    for turn in TURNS:
        messages.append({"role": "user", "content": turn})
        answer = model.chat(messages, max_new_tokens=args.new_tokens)
        s = model.last_stats
        print(f"turn {len(messages) // 2 + 1}: prompt {s.prompt_tokens} tokens, reused {s.reused_tokens}, "
              f"ttft {s.time_to_first_token * 1000:.0f} ms")
        messages.append({"role": "assistant", "content": answer})
    reused = model.last_stats
    fresh_answer = model.chat(messages[:-1], max_new_tokens=args.new_tokens, reuse_cache=False)
    fresh = model.last_stats
    print(f"turn 5 time to first token: {reused.time_to_first_token * 1000:.0f} ms with reuse "
          f"({reused.prefilled_tokens} of {reused.prompt_tokens} tokens prefilled), "
          f"{fresh.time_to_first_token * 1000:.0f} ms without ({fresh.prompt_tokens} prefilled); "
          f"answers equal: {fresh_answer == answer}")


if __name__ == "__main__":
    main()
