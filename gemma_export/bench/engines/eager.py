"""Engine child: eager transformers (float32) on the export's source weights: a Hugging Face
folder, or a GGUF file (dequantized by transformers' gguf_file= loader). torch threads =
spec.threads. Greedy, one forward per step with the model's KV cache, no stop ids."""

import time
from pathlib import Path

import _child
import torch
from transformers import AutoModelForCausalLM

spec = _child.read_spec()
torch.set_num_threads(spec.threads)
source = Path(spec.model)
start = time.perf_counter()
if source.suffix == ".gguf":
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
else:
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
model.eval()
load_s = time.perf_counter() - start
# Bytes of weights (tied tensors once): what one decode step reads when nothing is a gather.
params = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
embed = model.get_input_embeddings().weight
tied = embed.data_ptr() == model.get_output_embeddings().weight.data_ptr()
streamed = sum(params.values()) - (0 if tied else embed.numel() * embed.element_size())


@torch.no_grad()
def generate(prompt, n):
    # logits_to_keep=1: the LM head on the last position only, as transformers' generate does
    out = model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
    for i in range(n):
        token = out.logits[0, -1].argmax()
        yield int(token)
        if i + 1 < n:
            out = model(token.view(1, 1), past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)


_child.report(load_s, _child.measure(spec, generate), engine="eager", weight_bytes_per_token=streamed,
              kv_element_bytes=embed.element_size(),  # the cache holds the model dtype
              tied_lm_head=tied, torch=torch.__version__, attn_implementation=model.config._attn_implementation)
