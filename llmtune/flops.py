"""Model FLOPs per token and the device's peak, for the achieved TFLOP/s and MFU in every training log line.

The formula (PaLM, Chowdhery et al. 2022, appendix B), per trained token of a sequence of length T:

    flops_per_token = 6 * N + 12 * L * d * T

* N: the parameters that take part in matrix multiplications: every parameter except the input embedding tables
  (token, position, token-type: looked up, not multiplied), plus the output projection (`lm_head`) once, also
  when it is tied to the token embedding. 6 = 2 (multiply-add) x 3 (forward, gradient of the input, gradient of
  the weight); the convention of MFU counts every parameter as trained, whatever the strategy freezes.
* 12 * L * d * T: attention scores and their weighted sum (QK^T and AV: 2 matmuls of d * T multiply-adds per
  token per layer, x 2 FLOPs x 3 passes), with L the attention layers (encoder + decoder layers for T5;
  cross-attention counted like self-attention) and d = heads x head size (the hidden size).
* T is each batch's `input_ids` length and the tokens are its `input_ids` elements (padding included: the
  model computes on it). An encoder-decoder's decoder tokens are not counted, so its MFU is a lower bound.

achieved FLOP/s = sum over the window's batches of tokens x flops_per_token(T), over the window's seconds;
MFU = achieved / peak. The peak: for known GPUs the vendor's dense (no sparsity) figure for the training
precision (`GPU_PEAKS`); otherwise a short matmul probe in the training dtype, measured once per device,
thread count and dtype and cached in the llmtune cache directory (`peak_flops.json`).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Dense peak TFLOP/s by GPU name fragment and precision ("no" = fp32 without TF32), from the vendors' data sheets
# (A100 SXM/PCIe 80GB; H100 SXM5 and PCIe; H200 SXM). More specific fragments come first.
GPU_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "no": 51.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "no": 67.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "no": 67.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "no": 19.5}),
)
PROBE_SIZE = 1024  # square matmul of the probe: 2 * 1024^3 = 2.1 GFLOP per call
PROBE_CALLS = 4
CACHE_FILE = "peak_flops.json"


@dataclass(frozen=True)
class ModelFlops:
    """What the FLOPs of a model's training step depend on."""

    matmul_params: int  # N above
    attention_layers: int  # L
    hidden_size: int  # d

    def per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of a sequence of `seq_len` tokens: 6N + 12 L d T."""
        return 6.0 * self.matmul_params + 12.0 * self.attention_layers * self.hidden_size * seq_len


def model_flops(model: Any) -> ModelFlops:
    """N, L and d of a transformers model (under a peft or accelerate wrapper too)."""
    import torch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = inner.config
    seen: set[int] = set()
    total = 0
    for p in inner.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    embedded: set[int] = set()
    for module in inner.modules():
        if isinstance(module, torch.nn.Embedding):
            embedded.update(id(p) for p in module.parameters(recurse=False))
    embedding_params = sum(p.numel() for p in inner.parameters() if id(p) in embedded and id(p) in seen)
    # parameters() yields each tensor once, so the sum above counts every embedding table once.
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    tied_head = head.weight.numel() if head is not None and id(head.weight) in embedded else 0
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    if getattr(config, "is_encoder_decoder", False):
        encoder = getattr(config, "num_layers", None) or layers
        layers = encoder + (getattr(config, "num_decoder_layers", None) or encoder)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None) or getattr(config, "n_embd", 0)
    return ModelFlops(total - embedding_params + tied_head, int(layers), int(hidden))


@dataclass(frozen=True)
class Peak:
    """The device's peak FLOP/s for the training precision, and where the figure comes from."""

    flops: float
    source: str  # "table: ..." or "probe: ..."
    cache: Path | None = None  # where a probed figure is cached, and under which key
    key: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """For environment.json."""
        return {"tflops": round(self.flops / 1e12, 6), "source": self.source}

    def at_least(self, achieved: float) -> Peak:
        """A probed peak no lower than a rate training achieved: a probe taken while other processes loaded the
        machine measures too little, and a peak below what was achieved would give an MFU above 100 %. The raised
        figure replaces the cached one. Table peaks are never changed."""
        if self.key is None or self.cache is None or achieved <= self.flops:
            return self
        cached = read_cache(self.cache)
        cached[self.key] = max(achieved, cached.get(self.key, 0.0))
        write_cache(self.cache, cached)
        return Peak(achieved, f"{self.source}; raised to the rate training achieved", self.cache, self.key)


def table_peak(device_name: str, precision: str) -> Peak | None:
    """The data-sheet dense peak of a known GPU, or None."""
    for fragment, peaks in GPU_PEAKS:
        if fragment.lower() in device_name.lower() and precision in peaks:
            return Peak(peaks[precision] * 1e12, f"table: {fragment} {precision} dense peak (data sheet)")
    return None


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_flops(device: Any, dtype: Any, size: int = PROBE_SIZE, calls: int = PROBE_CALLS) -> float:
    """The best FLOP/s of `calls` square matmuls of `size` in `dtype` on `device` (after one warm-up call)."""
    import torch

    # A generator of its own: the probe runs after the seed is set, and must not move the global RNG (dropout).
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / max(best, 1e-9)


def device_peak(device: Any, precision: str, cache_dir: Path) -> Peak:
    """The peak for training on `device` at `precision` ("no", "bf16", "fp16"): a known GPU's table figure, else a
    matmul probe, measured once per (device name, threads, dtype) and cached in `cache_dir/peak_flops.json`."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = table_peak(name, precision)
        if known is not None:
            return known
    else:
        name = cpu_name()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    key = f"{device.type}|{name}|threads={torch.get_num_threads()}|{str(dtype).removeprefix('torch.')}"
    path = cache_dir / CACHE_FILE
    cached = read_cache(path)
    if key in cached:
        return Peak(float(cached[key]), f"probe: {key}, {PROBE_SIZE}x{PROBE_SIZE} matmul, cached in {path}", path, key)
    measured = probe_flops(device, dtype)
    cached[key] = measured
    write_cache(path, cached)
    return Peak(measured, f"probe: {key}, {PROBE_SIZE}x{PROBE_SIZE} matmul, measured now (cached in {path})", path, key)


def read_cache(path: Path) -> dict[str, float]:
    """The cached probe figures (an unreadable cache is as good as none: it is measured again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in data.items()} if isinstance(data, dict) else {}


def write_cache(path: Path, data: dict[str, float]) -> None:
    """Write the cache atomically (concurrent runs may probe at once; the last writer wins, each entry is valid)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
