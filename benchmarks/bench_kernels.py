"""What each of `train.fast_kernels`' substitutions gives, one at a time: training step time in one process.

    python benchmarks/bench_kernels.py [--repeats 8] [--steps 2] [--batch-size 16] [--block-size 128]

The benchmark's model (configs/models/gpt2-tiny.json: GPT-2 4x256, dropout 0.1, vocabulary --vocab-size) is built
once and copied into six variants: none (the model's own code), gelu (the fused tanh GELU only), loss (the
causal-LM loss without full logits only), dropout (the cheaper CPU dropout masks only), attention (the CPU
attention with its own dropout masks only) and all (what `train.fast_kernels: true` does to GPT-2). Each variant trains
with fused AdamW and clipping on the same random batch; after two warm-up steps each, the variants take turns,
`--steps` steps at a time, `--repeats` times, so drift of a busy machine hits them alike. Printed: each variant's
median seconds per step and its speed relative to none. The ratio against the stock Trainer is none's ratio (the
same model code: `python benchmarks/bench_causal_lm.py --no-fast-kernels`) times these.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("none", "gelu", "loss", "dropout", "attention", "all")


def build(args: argparse.Namespace) -> dict[str, tuple[Any, Any]]:
    """The variants, each with its own fused AdamW."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(ROOT))
    from llmtune import kernels

    keys = json.loads(Path(args.model_config).read_text(encoding="utf-8"))
    config = AutoConfig.for_model(keys.pop("model_type"), **keys, vocab_size=args.vocab_size)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    variants = {}
    for name in VARIANTS:
        model = copy.deepcopy(base).train()
        if name in ("gelu", "all"):
            kernels._replace_gelu(model)
        if name in ("loss", "all"):
            model.forward = kernels._fused_loss_forward(model)
        if name in ("dropout", "all"):
            kernels._replace_dropout(model)
        if name in ("attention", "all"):
            kernels._register_attention()
            model.config._attn_implementation = kernels.ATTENTION_NAME
        variants[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True))
    return variants


def main(argv: list[str] | None = None) -> int:
    """Alternate the variants, print the medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=8, help="Turns of each variant.")
    parser.add_argument("--steps", type=int, default=2, help="Training steps per turn.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--model-config", default=str(ROOT / "configs" / "models" / "gpt2-tiny.json"))
    args = parser.parse_args(argv)

    import torch

    variants = build(args)
    ids = torch.randint(
        0, args.vocab_size, (args.batch_size, args.block_size), generator=torch.Generator().manual_seed(1)
    )

    def step(model: Any, optimizer: Any) -> None:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for parts in variants.values():
        step(*parts)
        step(*parts)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, parts in variants.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step(*parts)
            times[name].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times["none"])
    print(
        f"GPT-2 {Path(args.model_config).name}, batch {args.batch_size} x {args.block_size}, torch threads "
        f"{torch.get_num_threads()}, {args.repeats} alternating turns of {args.steps} steps"
    )
    for name in VARIANTS:
        median = statistics.median(times[name])
        print(
            f"{name:<9} {median:6.3f} s/step (min {min(times[name]):.3f}, max {max(times[name]):.3f})"
            f"  speed vs none {base / median:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
