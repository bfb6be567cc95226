"""train.fast_kernels: the substituted kernels compute the same function, and nothing saved changes; and the
MFU figures (llmtune/flops.py): the FLOP formula against a hand calculation, the GPU table, the probe's cache."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from llmtune import flops, kernels
from tests.helpers import TINY_CONFIGS, read_metrics, run_cli_in_process, tiny_recipe, write_recipe

VOCAB = 100
# BERT and T5 with the gelu_new activation (BERT's default is the exact erf GELU, T5's relu: nothing to swap).
KERNEL_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("AutoModelForCausalLM", TINY_CONFIGS["gpt2"]),
    "bert": ("AutoModelForMaskedLM", {**TINY_CONFIGS["bert"], "hidden_act": "gelu_new"}),
    "t5": ("AutoModelForSeq2SeqLM", {**TINY_CONFIGS["t5"], "feed_forward_proj": "gated-gelu"}),
}


def build(family: str) -> Any:
    """A tiny model with fresh weights (seeded), in training mode."""
    import transformers
    from transformers import AutoConfig

    auto, keys = KERNEL_CONFIGS[family]
    keys = dict(keys)
    config = AutoConfig.for_model(keys.pop("model_type"), vocab_size=VOCAB, pad_token_id=0, **keys)
    if family == "t5":
        config.decoder_start_token_id = 0
    torch.manual_seed(0)
    return getattr(transformers, auto).from_config(config).train()


def inputs(family: str) -> dict[str, torch.Tensor]:
    """A padded batch with -100 labels, as the tasks feed it."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    ids[1, 9:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[0, :4] = -100
    if family == "t5":
        return {"input_ids": ids, "attention_mask": mask, "labels": labels[:, :7].contiguous()}
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["gpt2", "bert", "t5"])
def test_substitutions_give_the_same_outputs_loss_and_gradients(family: str, one_thread: Any) -> None:
    original = build(family)
    fast = copy.deepcopy(original)
    done = kernels.apply_fast_kernels(fast)
    assert any("gelu" in d for d in done), done
    assert not any(type(m).__name__ == "NewGELUActivation" for m in fast.modules())
    batch = inputs(family)

    # Training mode, with labels: the loss (fused for GPT-2) and every gradient.
    loss_a = original(**batch).loss
    loss_a.backward()
    loss_b = fast(**batch).loss
    loss_b.backward()
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-5)
    ga, gb = grads(original), grads(fast)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-6, msg=name)

    # Training mode without labels: the logits through the fused GELU.
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    if family == "t5":
        no_labels["decoder_input_ids"] = original._shift_right(batch["labels"].clamp(min=0))
    # BERT's encoder skips padding (llmtune/lean_encoder.py): its outputs at padding are nobody's, not compared.
    real: Any = batch["attention_mask"].bool() if family == "bert" else ...
    with torch.no_grad():
        torch.testing.assert_close(
            fast(**no_labels).logits[real], original(**no_labels).logits[real], rtol=1e-5, atol=1e-5
        )
        # Eval mode (evaluation, prediction, generation): the original formula, so bit-identical (BERT: to
        # float rounding, for the lean encoder's packed matrix products).
        original.eval()
        fast.eval()
        if family == "bert":
            torch.testing.assert_close(
                fast(**no_labels).logits[real], original(**no_labels).logits[real], rtol=1e-5, atol=1e-5
            )
            torch.testing.assert_close(fast(**batch).loss, original(**batch).loss, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(fast(**no_labels).logits, original(**no_labels).logits)
            assert torch.equal(fast(**batch).loss, original(**batch).loss)


def test_saved_model_is_unchanged_and_loads_with_plain_transformers(tmp_path: Path, one_thread: Any) -> None:
    from transformers import AutoModelForCausalLM

    original = build("gpt2")
    fast = copy.deepcopy(original)
    kernels.apply_fast_kernels(fast)
    a, b = original.state_dict(), fast.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert fast.config.to_dict() == original.config.to_dict()
    original.save_pretrained(tmp_path / "a")
    fast.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "config.json").read_text() == (tmp_path / "b" / "config.json").read_text()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "b").eval()
    ids = inputs("gpt2")["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, original.eval()(input_ids=ids).logits)


@pytest.mark.parametrize("chunk_elements", [1 << 22, 7 * VOCAB])  # one chunk; several chunks with a ragged end
@pytest.mark.parametrize("given_count", [True, False])
def test_fused_loss_equals_transformers_loss(
    chunk_elements: int, given_count: bool, monkeypatch: pytest.MonkeyPatch, one_thread: Any
) -> None:
    from transformers.loss.loss_utils import ForCausalLMLoss

    monkeypatch.setattr(kernels, "_CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(kernels, "_MIN_CHUNK_ROWS", 1)
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 12, 16, generator=gen, requires_grad=True)
    weight = torch.randn(VOCAB, 16, generator=gen, requires_grad=True)
    labels = inputs("gpt2")["labels"]  # padding and a prefix at -100
    count = (labels[:, 1:] != -100).sum() if given_count else None

    expected = ForCausalLMLoss(hidden @ weight.t(), labels, VOCAB, num_items_in_batch=count)
    expected.backward()
    want_h, want_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    got = kernels.causal_lm_loss(hidden, weight, labels, count)
    (got * 3.0).backward()  # the incoming gradient scales both results (as a loss scaler's does)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad, 3.0 * want_h, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad, 3.0 * want_w, rtol=1e-5, atol=1e-7)


def test_fused_loss_is_only_taken_while_training_with_gradients(one_thread: Any) -> None:
    model = build("gpt2")
    kernels.apply_fast_kernels(model)
    batch = inputs("gpt2")
    assert model(**batch).logits is None  # training with labels: the fused loss, no logits
    with torch.no_grad():
        assert model(**batch).logits is not None
    assert model.eval()(**batch).logits is not None
    assert model.train()(input_ids=batch["input_ids"], logits_to_keep=1).logits.shape[1] == 1  # own forward
    model.lm_head.weight.ds_id = 0  # as DeepSpeed ZeRO-3 marks a partitioned parameter
    assert model(**batch).logits is not None


def test_nothing_is_fused_where_the_function_would_differ(one_thread: Any) -> None:
    model = build("gpt2")
    model.config.loss_type = "ForMaskedLM"
    assert kernels.apply_fast_kernels(model) == ["gelu_new -> fused tanh GELU (2 modules)"]
    bert = build("bert")
    bert.config.hidden_act = "gelu"
    assert not any("loss" in d for d in kernels.apply_fast_kernels(bert))


def test_keep_mask_draws_independent_bernoulli_elements_from_the_seeded_generator() -> None:
    torch.manual_seed(3)
    p, count = 0.1, 1 << 20
    weights = kernels.keep_mask((count,), p)
    assert weights.dtype == torch.float32 and weights.shape == (count,)
    assert set(weights.unique().tolist()) == {0.0, 1.0}
    mask = weights.bool()
    sigma = (p * (1 - p) / count) ** 0.5
    # Both 31-bit halves of each 64-bit word (even and odd elements) keep with probability 1 - p.
    for part in (mask, mask[0::2], mask[1::2]):
        assert abs(part.float().mean().item() - (1 - p)) < 6 * sigma * (count / part.numel()) ** 0.5
    # Neighbours are independent: P(both kept) = (1 - p)^2.
    both = (mask[:-1] & mask[1:]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 6 * sigma * 2
    torch.manual_seed(3)
    assert torch.equal(kernels.keep_mask((count,), p), weights)  # reproducible from the seed
    assert kernels.keep_mask((3, 5, 7), 0.5).shape == (3, 5, 7)  # odd sizes
    # The integer comparison at the edges: u >= threshold keeps, for every threshold (p near 0 and near 1).
    assert kernels.keep_mask((4096,), 1e-12).min().item() == 1.0
    assert kernels.keep_mask((4096,), 1 - 2**-31).max().item() == 0.0


def test_dropout_attention_equals_the_formula_with_the_same_mask_and_its_gradients() -> None:
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=gen, requires_grad=True) for _ in range(3))
    grad = torch.randn(2, 3, 9, 8, generator=gen)
    scale, p = 0.3, 0.2
    attention = kernels._dropout_attention_function()
    for causal in (True, False):
        torch.manual_seed(5)
        out = attention.apply(q, k, v, p, scale, causal)
        got = torch.autograd.grad(out, (q, k, v), grad)
        torch.manual_seed(5)
        keep = kernels.keep_mask((2 * 3, 9, 9), p).view(2, 3, 9, 9)  # the same draw, in the same order
        scores = q @ k.transpose(-1, -2) * scale
        if causal:
            scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
        expected = (scores.softmax(-1) * keep / (1 - p)) @ v
        want = torch.autograd.grad(expected, (q, k, v), grad)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert 0.6 < keep.mean().item() < 0.95


def test_gpt2_attention_with_dropout_takes_the_fast_path_only_while_training(tmp_path: Path, one_thread: Any) -> None:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    keys = dict(TINY_CONFIGS["gpt2"])
    config = AutoConfig.for_model(keys.pop("model_type"), vocab_size=VOCAB, **{**keys, "attn_pdrop": 0.1})
    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(config).train()
    fast = copy.deepcopy(original)
    assert any("attention" in d for d in kernels.apply_fast_kernels(fast))
    ids = inputs("gpt2")["input_ids"]
    calls = []
    fast_path = kernels._dropout_attention_function()
    original_apply = fast_path.apply
    fast_path.apply = lambda *a: calls.append(a[3]) or original_apply(*a)  # type: ignore[method-assign]
    try:
        fast(input_ids=ids, labels=ids).loss.backward()
        assert calls == [0.1] * fast.config.n_layer
        with torch.no_grad():  # eval: transformers' sdpa, bit-identical to the unpatched model
            assert torch.equal(fast.eval()(input_ids=ids).logits, original.eval()(input_ids=ids).logits)
        assert len(calls) == fast.config.n_layer
    finally:
        fast_path.apply = original_apply  # type: ignore[method-assign]
    assert fast.config.to_dict() == original.config.to_dict()
    fast.save_pretrained(tmp_path / "fast")
    original.save_pretrained(tmp_path / "original")
    assert (tmp_path / "fast" / "config.json").read_text() == (tmp_path / "original" / "config.json").read_text()
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fast").config._attn_implementation == "sdpa"


def test_fast_dropout_scales_kept_elements_and_backpropagates_through_the_same_mask() -> None:
    dropout = torch.nn.Sequential(torch.nn.Dropout(0.25))
    assert kernels._replace_dropout(dropout) == 1
    layer = dropout[0]
    assert isinstance(layer, torch.nn.Dropout) and type(layer).__name__ == "FastDropout"
    x = torch.randn(64, 33, requires_grad=True)
    out = layer(x)
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / 0.75)
    assert 0.6 < kept.float().mean().item() < 0.9
    out.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.75)
    # backward multiplies by the forward's mask (not a fresh one), for any incoming gradient
    x.grad = None
    grad = torch.randn(64, 33)
    out = layer(x)
    out.backward(grad)
    torch.testing.assert_close(x.grad, torch.where(out != 0, grad / 0.75, 0.0))
    layer.eval()
    assert torch.equal(layer(x), x)
    # p = 0 dropouts are left alone (nothing to draw)
    assert kernels._replace_dropout(torch.nn.Sequential(torch.nn.Dropout(0.0))) == 0


# --- FLOPs and MFU ----------------------------------------------------------------------------------------------


def test_flop_formula_matches_a_hand_calculation() -> None:
    model = build("gpt2")  # 2 layers, d = 32, vocabulary 100, 128 positions, lm_head tied to wte
    # Per layer: ln_1 2d + c_attn (d*3d + 3d) + attn c_proj (d*d + d) + ln_2 2d + c_fc (d*4d + 4d) + mlp c_proj
    # (4d*d + d) = 12 d^2 + 13 d = 12704; ln_f 2d = 64; the tied lm_head V*d = 3200 (its matmul counts);
    # wte (3200) and wpe (128*32) are lookups and do not count.
    n = 2 * 12704 + 64 + 3200
    counted = flops.model_flops(model)
    assert counted == flops.ModelFlops(matmul_params=n, attention_layers=2, hidden_size=32)
    assert n == 28672
    # 6N + 12 L d T at T = 12: 172032 + 9216.
    assert counted.per_token(12) == 6 * 28672 + 12 * 2 * 32 * 12 == 181248
    t5 = flops.model_flops(build("t5"))
    assert (t5.attention_layers, t5.hidden_size) == (4, 32)  # encoder + decoder layers


def test_gpu_peaks_come_from_the_table() -> None:
    h100 = flops.table_peak("NVIDIA H100 80GB HBM3", "bf16")
    assert h100 is not None and h100.flops == 989e12 and h100.source.startswith("table:")
    assert flops.table_peak("NVIDIA H100 PCIe", "fp16").flops == 756e12  # type: ignore[union-attr]
    assert flops.table_peak("NVIDIA A100-SXM4-80GB", "no").flops == 19.5e12  # type: ignore[union-attr]
    assert flops.table_peak("NVIDIA GeForce RTX 4090", "bf16") is None


def test_probe_is_measured_once_per_device_threads_and_dtype(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []

    def fake_probe(device: Any, dtype: Any) -> float:
        calls.append(dtype)
        return 1.5e9 * len(calls)

    monkeypatch.setattr(flops, "probe_flops", fake_probe)
    cpu = torch.device("cpu")
    first = flops.device_peak(cpu, "no", tmp_path)
    assert first.flops == 1.5e9 and "measured now" in first.source and len(calls) == 1
    again = flops.device_peak(cpu, "no", tmp_path)
    assert again.flops == 1.5e9 and "cached" in again.source and len(calls) == 1
    assert flops.device_peak(cpu, "bf16", tmp_path).flops == 3e9 and calls[-1] == torch.bfloat16
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert flops.device_peak(cpu, "no", tmp_path).flops == 4.5e9  # another thread count: measured again
    finally:
        torch.set_num_threads(threads)
    assert len(json.loads((tmp_path / flops.CACHE_FILE).read_text())) == 3
    # A probe that measured less than training then achieved (a busy machine) is raised, in the cache too.
    raised = flops.device_peak(cpu, "no", tmp_path).at_least(2e9)
    assert raised.flops == 2e9 and "raised" in raised.source
    assert flops.device_peak(cpu, "no", tmp_path).flops == 2e9 and len(calls) == 3
    assert raised.at_least(1e9) is raised
    table = flops.table_peak("NVIDIA H200", "bf16")
    assert table is not None and table.at_least(1e16) is table  # a data-sheet peak is never changed
    (tmp_path / flops.CACHE_FILE).write_text("not json")
    assert flops.device_peak(cpu, "no", tmp_path).flops == 6e9  # an unreadable cache is measured again


def test_probe_measures_a_plausible_rate_without_moving_the_global_rng() -> None:
    state = torch.get_rng_state()
    rate = flops.probe_flops(torch.device("cpu"), torch.float32, size=128, calls=2)
    assert 1e6 < rate < 1e15
    assert torch.equal(torch.get_rng_state(), state)  # a resumed run (cache hit, no probe) sees the same dropout


# --- through the CLI ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_logs_mfu_and_records_kernels(
    corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread_cli: Any
) -> None:
    runs = {}
    for fast in (True, False):
        out = tmp_path / f"run-{fast}"
        train = {"max_steps": 4, "log_every": 2, "fast_kernels": fast}
        recipe = write_recipe(tmp_path / f"r-{fast}.yaml", tiny_recipe(corpus, out, train=train))
        code, stdout, stderr = run_cli_in_process(capsys, "pretrain", str(recipe))
        assert code == 0, stderr[-3000:]
        runs[fast] = (out, stdout)
    out, stdout = runs[True]
    env = json.loads((out / "environment.json").read_text())
    assert [k.split(" ->")[0] for k in env["fast_kernels"]] == ["gelu_new", "causal-LM loss"]
    assert env["flops"]["N"] > 0 and env["flops"]["peak"]["source"].startswith(("probe:", "table:"))
    records = [r for r in read_metrics(out) if "train/loss" in r]
    assert len(records) == 2 and all(r["train/tflops"] > 0 and 0 < r["train/mfu"] < 1 for r in records)
    assert "MFU " in stdout
    plain, _ = runs[False]
    assert json.loads((plain / "environment.json").read_text())["fast_kernels"] == []
    # Same data, seed and weights: the two runs' losses agree to float tolerance (dropout is off in TINY_GPT2).
    other = [r for r in read_metrics(plain) if "train/loss" in r]
    assert [r["train/loss"] for r in records] == pytest.approx([r["train/loss"] for r in other], rel=1e-4)
