"""Hugging Face baselines timed the way /work/shared/measure/anchors_gpu.py times them:
transformers eager with every weight on the device, and Accelerate `device_map` offload."""

from __future__ import annotations

import time

import torch

from aioffload.bench.common import say, sync


def per_step(model: torch.nn.Module, batch: int, input_len: int, vocab: int, dev: torch.device, new: int = 9) -> float:
    """anchors_gpu.py's per_token: (generate(new) - generate(1)) / (new - 1), after a warm-up generate(2)."""
    gen = torch.Generator(dev).manual_seed(0)
    ids = torch.randint(0, vocab, (batch, input_len), device=dev, generator=gen)  # [B, input_len]

    def gen_time(n: int) -> float:
        sync(dev)
        t = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)  # fmt: skip
        sync(dev)
        return time.perf_counter() - t

    gen_time(2)
    t1, tn = gen_time(1), gen_time(new)
    return (tn - t1) / (new - 1)


def load(path: str, dtype: torch.dtype) -> torch.nn.Module:
    """The checkpoint as a transformers model in host memory."""
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    say(f"transformers: loaded {path} in {time.perf_counter() - t:.1f} s")
    return model


def accelerate_offload(model: torch.nn.Module, dev: torch.device, gpu_budget: str, cpu_budget: str) -> dict:
    """Dispatch `model` (in host memory) over GPU + CPU exactly as anchors_gpu.py does; returns
    the device-map figures. The model's weights beyond the budget stay on the host."""
    from accelerate import dispatch_model, infer_auto_device_map

    index = dev.index if dev.index is not None else 0
    dm = infer_auto_device_map(model, max_memory={index: gpu_budget, "cpu": cpu_budget},
                               no_split_module_classes=["LlamaDecoderLayer"])  # fmt: skip
    on_gpu = sum(1 for v in dm.values() if v == index)
    dispatch_model(model, device_map=dm)
    gpu_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cuda")
    say(f"accelerate: {on_gpu} of {len(dm)} device-map entries on GPU {index} ({gpu_bytes / 1e9:.2f} GB)")
    return {"device_map_gpu_entries": on_gpu, "device_map_entries": len(dm), "gpu_weight_gb": round(gpu_bytes / 1e9, 2)}
