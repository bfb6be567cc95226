"""ONNX: export a fine-tuned model's forward pass, quantise it to int8, and run it where a torch model ran.

Export goes through `torch.onnx.export(dynamo=True)` (the TorchScript exporter, `dynamo=False`, traced
transformers 5's attention masks wrongly here: logits off by 4e-2), with the batch and sequence axes
dynamic, written as one self-contained file. int8 is ONNX Runtime's dynamic quantisation
(`quantize_dynamic`, int8 weights, activations quantised per batch at run time): measured on this
2-core CPU with all-MiniLM-L6-v2 it ran ~2.5x the fp32 PyTorch throughput at batch 32, where torchao's
int8 dynamic config on the PyTorch model gave ~1.5x (and a checkpoint only torchao can load), so int8
exports are ONNX files. `OnnxModel` wraps an ONNX Runtime session as a module the tasks call like a
transformers model (`model(**inputs).logits`).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from llmtune.errors import UserError

ONNX_FILE = "model.onnx"
# What each exportable task's model returns, in order (the ONNX graph's outputs).
OUTPUTS = {
    "sequence-classification": ("logits",),
    "token-classification": ("logits",),
    "relation-classification": ("logits",),  # entity_start: per-token logits, read at the markers by the task
    "question-answering": ("start_logits", "end_logits"),
}
EXTRA = "pip install 'llmtune[export]'"


def require(module: str, what: str) -> Any:
    """Import an optional dependency of the export extra, or refuse in one line naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} needs the {module} package, in the export extra: {EXTRA}") from None


def check_exportable(task_name: str, what: str) -> tuple[str, ...]:
    """The output names of a task that exports to ONNX; refuse the others, naming what can."""
    if task_name not in OUTPUTS:
        raise UserError(
            f"{what}: {task_name} is not exported to ONNX: it generates text or pretrains, which needs a "
            "KV-cache-aware export (optimum-onnx, which supports only transformers < 4.58); ONNX and int8 take "
            f"{', '.join(OUTPUTS)}; --prune works for every task"
        )
    return OUTPUTS[task_name]


def export_onnx(model: Any, inputs: dict[str, Any], outputs: tuple[str, ...], path: Path) -> None:
    """Write `model`'s forward pass on `inputs` (a batch of the task's inputs) to one ONNX file at `path`."""
    import torch

    onnx = require("onnx", "--format onnx")
    require("onnxscript", "--format onnx")

    import logging
    import warnings

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed" lines
    warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape constraints")
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    tmp = path.with_name(path.name + ".tmp")
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False  # a KV cache in the outputs is not a tensor torch.export can return
    with torch.no_grad(), _refusing_what_cannot_export(model):
        # The model's output (a ModelOutput) flattens to its tensors in field order: `outputs` names them.
        program = torch.onnx.export(
            model.eval(),
            (),
            kwargs=inputs,
            dynamic_shapes={name: {0: batch, 1: sequence} for name in inputs},
            output_names=list(outputs),
            dynamo=True,
            verbose=False,
        )
    model.config.use_cache = use_cache
    program.save(str(tmp))
    onnx.save(onnx.load(str(tmp)), str(path), save_as_external_data=False)  # one file: weights inline
    for leftover in path.parent.glob(tmp.name + "*"):
        leftover.unlink()


@contextlib.contextmanager
def _refusing_what_cannot_export(model: Any) -> Iterator[None]:
    """torch.export cannot capture every model (T5's classification and QA heads pool data-dependently): one line
    naming the model and the reason, instead of torch's report."""
    try:
        yield
    except Exception as exc:
        text = str(exc)
        summary = text.split("## Exception summary", 1)[-1].strip().splitlines()
        reason = (summary[0] if summary else type(exc).__name__)[:200]
        raise UserError(
            f"--format onnx: torch.export cannot capture this {model.config.model_type} "
            f"{type(model).__name__} ({reason}); export it with --prune or as a plain directory, or use an "
            "encoder (BERT-style) or GPT-2 model"
        ) from None


def quantize_int8(source: Path, target: Path) -> None:
    """ONNX Runtime's dynamic int8 quantisation of `source` into `target`."""
    import logging

    quantization = require("onnxruntime.quantization", "--quantize int8")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it logs a "consider pre-processing" advice to the root logger on every call
    try:
        quantization.quantize_dynamic(str(source), str(target), weight_type=quantization.QuantType.QInt8)
    finally:
        root.setLevel(level)


def onnx_parameters(path: Path) -> int:
    """How many weight values an ONNX file holds (its initializers' elements)."""
    import math

    onnx = require("onnx", "an ONNX model")
    graph = onnx.load(str(path)).graph
    return sum(math.prod(t.dims) for t in graph.initializer if t.data_type != onnx.TensorProto.INT64)


class OnnxModel:
    """An ONNX Runtime session called like a transformers model: keyword tensors in, named outputs out.

    Holds the saved config (label maps, context length) as `config`; runs on the CPU provider with
    torch's intra-op thread count, and feeds only the inputs the graph declares.
    """

    training = False

    def __init__(self, directory: str | Path, config: Any) -> None:
        import torch

        ort = require("onnxruntime", "an ONNX model")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3  # errors only: its warnings would break the one-line contract
        self.session = ort.InferenceSession(
            str(Path(directory) / ONNX_FILE), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.config = config

    def __call__(self, **batch: Any) -> Any:
        import torch

        feed = {k: v.detach().cpu().numpy() for k, v in batch.items() if k in self.inputs}
        values = self.session.run(self.outputs, feed)
        return SimpleNamespace(**{name: torch.from_numpy(v) for name, v in zip(self.outputs, values, strict=True)})

    def eval(self) -> OnnxModel:
        """Already in inference mode (kept for the evaluation loop's calls)."""
        return self

    def train(self, mode: bool = True) -> OnnxModel:
        """An ONNX model does not train."""
        return self


def is_onnx_directory(directory: str | Path) -> bool:
    """Whether a model directory holds an ONNX export (and so runs on ONNX Runtime)."""
    return (Path(directory) / ONNX_FILE).is_file()
