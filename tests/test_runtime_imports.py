"""The device side must run without torch, transformers or onnx installed.

The child process blocks those three, imports every runtime module (the multimodal ones too) and
then runs the image and audio pre-processing once, so that their lazy imports (pillow, soundfile,
soxr) are taken as well: none of them may pull torch, transformers or onnx in.
"""

import subprocess
import sys

CODE = """
import sys, tempfile
from pathlib import Path
for name in ("torch", "transformers", "onnx"):
    sys.modules[name] = None  # any import of them now raises ImportError
import gemma_runtime, gemma_runtime.cli, gemma_runtime.integrity, gemma_runtime.tables
import gemma_runtime.kv_cache, gemma_runtime.detokenize, gemma_runtime.sampling
import gemma_runtime.chat_template, gemma_runtime.prompt_cache, gemma_runtime.providers
import gemma_runtime.session_cache, gemma_runtime.stop_strings, gemma_runtime.generation_config
import gemma_runtime.multimodal, gemma_runtime.image_processing, gemma_runtime.audio_features
import gemma_runtime.npu_inputs, gemma_runtime.npu_decoder
import numpy as np
from PIL import Image
import soundfile
from gemma_runtime.audio_features import audio_features
from gemma_runtime.image_processing import ImageProcessor, ImageProcessorConfig
from gemma_runtime.multimodal import expand_placeholders

root = Path(tempfile.mkdtemp())
Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(root / "image.png")
config = ImageProcessorConfig.from_dict({"size": {"height": 32, "width": 32}, "do_normalize": False})
assert ImageProcessor(config)(root / "image.png").shape == (1, 3, 32, 32)
t = np.arange(4_410) / 44_100
soundfile.write(root / "clip.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 44_100)
features, mask = audio_features(root / "clip.wav")  # soundfile, then soxr from 44.1 kHz
assert features.shape == (1, 2997, 128) and mask.shape == (1, 2997), (features.shape, mask.shape)
names = {"image": "<i>", "boi": "<b>", "eoi": "<e>"}
assert expand_placeholders("<i>", names, {"image": 2}) == "\\n\\n<b><i><i><e>\\n\\n"
print(gemma_runtime.__version__)
"""


def test_runtime_imports_without_torch_transformers_onnx():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
