"""A router's encoder run by ONNX Runtime: the served decision's fast path on CPU (`Router(runtime="onnx")`,
`zooter gateway --runtime onnx`).

At batch 1 on two cores PyTorch's eager encoder is compute- and dispatch-bound (e5-small: ~25 ms a decision).
ONNX Runtime runs the same graph with fused attention / LayerNorm / GELU kernels; in float32 it gives the same
features (to ~1e-6), in int8 (dynamically quantised MatMuls) features close to them (benchmarks/serving.py
measures latency and how many decisions change). The exported graph computes encoder + pooling, so the head stays
in torch and is shared with the other paths.

The export is cached under the models cache (`ZOOTER_CACHE`), keyed by what fixes the graph's weights (the shipped
encoder's identity, or a fine-tuned router's weights file digest) and the precision, and written atomically:
a second load of the same router starts in well under a second.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from cluster import models

Precision = Literal["float32", "int8"]
OPSET = 17


class PooledEncoder(nn.Module):
    """encoder -> pooled features: the graph that is exported."""

    def __init__(self, encoder: nn.Module, pool_fn, pooling: str):
        super().__init__()
        self.encoder, self.pool_fn, self.pooling = encoder, pool_fn, pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.pool_fn(h, attention_mask, self.pooling)


def cache_path(key: str, precision: Precision) -> Path:
    return models.cache_root() / "onnx" / f"{key}-{precision}.onnx"


@contextmanager
def _eager_attention(encoder: nn.Module):
    """Export with the eager attention: its graph is the pattern ORT's optimizer fuses into one Attention op (the
    SDPA graph is not recognised and stays a dozen small ops per layer)."""
    cfg = encoder.config
    before = cfg._attn_implementation
    encoder.set_attn_implementation("eager")
    try:
        yield
    finally:
        encoder.set_attn_implementation(before)


def export(encoder: nn.Module, pool_fn, pooling: str, out: Path, precision: Precision) -> Path:
    """Write the ONNX graph of encoder + pooling to `out` (atomically), fused and, for int8, quantised."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = encoder.config
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        raw, fused = Path(tmp) / "raw.onnx", Path(tmp) / "fused.onnx"
        ids = torch.ones((1, 8), dtype=torch.long)
        module = PooledEncoder(encoder, pool_fn, pooling).eval()
        quiet = logging.getLogger("onnxruntime")  # the optimizer logs every fusion it tries at INFO/WARNING
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with _eager_attention(encoder), warnings.catch_warnings(), torch.inference_mode(False):
                warnings.simplefilter("ignore")  # TorchScript-exporter deprecation and tracer warnings
                torch.onnx.export(module, (ids, torch.ones_like(ids)), str(raw), input_names=["input_ids",
                                  "attention_mask"], output_names=["features"], opset_version=OPSET, dynamo=False,
                                  dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                                                "attention_mask": {0: "batch", 1: "tokens"}})
            try:  # BERT-family fusions; another encoder family keeps its unfused graph (same numbers, slower)
                opt = optimizer.optimize_model(str(raw), model_type="bert", num_heads=cfg.num_attention_heads,
                                               hidden_size=cfg.hidden_size)
                opt.save_model_to_file(str(fused))
            except Exception:  # noqa: BLE001 - fusion is an optimisation only
                fused = raw
            if precision == "int8":
                final = Path(tmp) / "int8.onnx"
                # the fused ops come from ORT's own domain, which shape inference cannot type: say they are float.
                # The quantiser advises pre-processing on the root logger: that is for static quantisation.
                logging.disable(logging.WARNING)
                try:
                    quantize_dynamic(str(fused), str(final), weight_type=QuantType.QInt8,
                                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
                finally:
                    logging.disable(logging.NOTSET)
            else:
                final = fused
        finally:
            quiet.setLevel(level)
        os.replace(final, out)  # same directory: atomic; a reader never sees a half-written graph
    return out


class OnnxEncoder:
    """features(input_ids, attention_mask) -> pooled float32 features, from an exported graph."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or torch.get_num_threads()
        so.inter_op_num_threads = 1
        # Threads sleep between parallel sections instead of spinning: a served router shares its cores with the
        # event loop, the HTTP client and other processes, and spinning threads take the CPU they wait for
        # (benchmarks/serving.py, (c): on a loaded 2-core machine 2x the texts/s at batch 1 and 32, float32 and int8)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # errors only
        self.path = path
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    @classmethod
    def load_or_export(cls, encoder: nn.Module, pool_fn, pooling: str, key: str,
                       precision: Precision) -> OnnxEncoder:
        path = cache_path(key, precision)
        if not path.is_file():
            export(encoder, pool_fn, pooling, path, precision)
        return cls(path)

    def features(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"input_ids": input_ids.astype(np.int64),
                                       "attention_mask": attention_mask.astype(np.int64)})[0]
