"""ONNX export of the one-step model: LR at the output size -> SR, in one graph.

The graph is `super_resolve(backbone, lr_up, steps=1)` with the LoRA merged into the UNet:
VAE encode (identity for the pixel backbone), one velocity evaluation at t = 1, one Euler step
to t = 0, VAE decode, clamp. Exported with `torch.onnx.export(dynamo=True)`; batch, height and
width stay dynamic (the example input has batch 2: a batch-1 example fixes the batch to 1).

Input contract (also written into the file's metadata, `metadata_props`):
    "lr_up"  float32 (B, 3, H, W), RGB, values in [-1, 1]: the LR image resized bicubically
             (PyTorch / OpenCV bicubic, A = -0.75, half-pixel centres) to the output size,
             H and W multiples of the backbone's size multiple (replicate-pad, then crop).
    "sr"     float32 (B, 3, H, W), RGB, values in [-1, 1]; no colour correction (the upscale
             job applies it; `flowsr.color.wavelet_color_fix` against lr_up is the default).
An fp16 file keeps float32 input and output and runs in float16 inside.

The export checks itself: the written graph runs in onnxruntime on a few inputs and its outputs
must equal torch's within a stated tolerance, or nothing is written (`ExportError`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

INPUT_NAME, OUTPUT_NAME = "lr_up", "sr"
DEFAULT_OPSET = 20
DTYPES = ("fp32", "fp16")
# max |onnxruntime - torch| on outputs in [-1, 1] (one 8-bit level is 2/255 = 7.8e-3): fp32 is a
# quarter level; fp16 against the fp32 torch graph is coarse (tiny random SD: ~6e-2)
TOLERANCE = {"fp32": 2e-3, "fp16": 1e-1}
PROTOBUF_LIMIT = 2 << 30  # one ONNX protobuf holds at most 2 GiB: larger weights go to external data
PROTOBUF_MARGIN = 64 << 20  # room for the graph itself next to the weights
CHECK_GRID = ((2, 4, 6), (1, 6, 4))  # (batch, height, width) of the self-check inputs, in size multiples
METADATA_PREFIX = "flowsr."


class ExportError(ValueError):
    """The model cannot be exported, or its exported graph does not match torch; one line."""


def require_onnx() -> None:
    """onnx, onnxruntime and onnxscript (torch's dynamo exporter builds graphs with it), or one line
    naming the extra that brings them."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ExportError(f"ONNX export and the onnxruntime backend need the `onnx` extra "
                          f"(pip install 'flowsr-ray[onnx]'): {err}") from None


@dataclass(frozen=True)
class ExportReport:
    path: str
    dtype: str
    opset: int
    size_multiple: int
    parameters: int
    external_data: bool
    max_error: float  # max |onnxruntime - torch| over the check inputs
    tolerance: float
    seconds: float


class OneStepSR(nn.Module):
    """`lr_up` (B, 3, H, W) in [-1, 1], the LR at the output size -> SR in [-1, 1]: one Euler step
    of the SR flow from t = 1 (`flowsr.sample.super_resolve`)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, lr_up: torch.Tensor) -> torch.Tensor:
        from .sample import super_resolve

        return super_resolve(self.backbone, lr_up, steps=1)


def one_step_module(backbone) -> OneStepSR:
    """The exportable module of `backbone`: LoRA merged, fp32, eval; only the SR flow (t = 1 starts
    at the LR) is a deterministic one-step graph."""
    from .upscaler import merge_adapters

    if backbone.cfg.flow_source != "sr_flow":
        raise ExportError(f"only flow_source 'sr_flow' exports (one deterministic step); this model starts from "
                          f"{backbone.cfg.flow_source!r}, which needs noise")
    merge_adapters(backbone)
    return OneStepSR(backbone.float()).eval().requires_grad_(False)


def input_contract(multiple: int) -> dict:
    """What the graph expects and returns, as the file's metadata (string values)."""
    return {"input": f"{INPUT_NAME}: float32 (batch, 3, height, width) RGB in [-1, 1], the LR resized bicubically "
                     f"(A=-0.75, half-pixel centres) to the output size; height and width multiples of {multiple}",
            "output": f"{OUTPUT_NAME}: float32 (batch, 3, height, width) RGB in [-1, 1], not colour-corrected",
            "size_multiple": str(multiple), "layout": "NCHW", "range": "[-1, 1]", "steps": "1"}


# ---- export ---------------------------------------------------------------------------------------
def _example(multiple: int, grid: Tuple[int, int, int], seed: int) -> torch.Tensor:
    b, h, w = grid
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h * multiple, w * multiple, generator=g) * 2 - 1


def _onnx_model(module: OneStepSR, example: torch.Tensor, opset: int):
    """The `onnx.ModelProto` of `module`, batch / height / width dynamic, dims named."""
    from torch.export import Dim

    dims = {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC}
    program = torch.onnx.export(module, (example,), dynamo=True, dynamic_shapes={INPUT_NAME: dims},
                                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset,
                                verbose=False)
    model = program.model_proto
    _name_dims(model)
    return model


DIM_NAMES = ("batch", None, "height", "width")


def _name_dims(model) -> None:
    """Rename the exporter's symbols (s0, s77, ...) of the input's dims to batch / height / width
    everywhere in the graph, and give the output the same names: for sizes that are multiples of
    the size multiple the output has the input's shape (the exporter writes it as `8*((s23//8))`)."""
    names = {}
    for dim, name in zip(model.graph.input[0].type.tensor_type.shape.dim, DIM_NAMES):
        if name and dim.dim_param:
            names[dim.dim_param] = name
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]
    for dim, name in zip(model.graph.output[0].type.tensor_type.shape.dim, DIM_NAMES):
        if name and dim.dim_param:
            dim.dim_param = name


def _to_fp16(model):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True)


def _check_dynamic(model) -> None:
    """The input and output must be (batch, 3, height, width) with batch, height, width symbolic."""
    for value in (model.graph.input[0], model.graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        fixed = [i for i in (0, 2, 3) if not dims[i].dim_param]
        if len(dims) != 4 or fixed or dims[1].dim_value != 3:
            shape = [d.dim_param or d.dim_value for d in dims]
            raise ExportError(f"exported {value.name} has shape {shape}; expected (batch, 3, height, width) with "
                              "batch, height and width dynamic")


def session(path: str, providers: Sequence[str] = ("CPUExecutionProvider",), threads: Optional[int] = None):
    """An onnxruntime session of `path` (`threads` intra-op threads; None: onnxruntime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(path, sess_options=options, providers=list(providers))


def max_difference(path: str, module: OneStepSR, inputs: Sequence[torch.Tensor]) -> float:
    """max |onnxruntime(path) - module| over `inputs`."""
    sess = session(path)
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            got = torch.from_numpy(sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
            want = module(x)
            if got.shape != want.shape:
                raise ExportError(f"exported graph gives {tuple(got.shape)} for {tuple(x.shape)}, torch {tuple(want.shape)}")
            worst = max(worst, float((got - want).abs().max()))
    return worst


def export_onnx(backbone, path: str, *, dtype: str = "fp32", opset: int = DEFAULT_OPSET,
                tolerance: Optional[float] = None, metadata: Optional[dict] = None,
                external_over: int = PROTOBUF_LIMIT - PROTOBUF_MARGIN) -> ExportReport:
    """Export the one-step model of `backbone` to `path`, check it, and write it atomically.

    Weights beyond `external_over` bytes go to `<path>.data` beside it (ONNX external data). The
    written graph is run in onnxruntime on CHECK_GRID inputs; if its outputs differ from torch's by
    more than `tolerance` (default TOLERANCE[dtype]), ExportError and nothing is written."""
    import onnx

    from .sample import size_multiple

    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype: {dtype!r} (choose from {', '.join(DTYPES)})")
    require_onnx()
    tolerance = TOLERANCE[dtype] if tolerance is None else tolerance
    start = time.perf_counter()
    module = one_step_module(backbone)
    multiple = size_multiple(backbone)
    model = _onnx_model(module, _example(multiple, CHECK_GRID[0], seed=0), opset)
    _check_dynamic(model)
    if dtype == "fp16":
        model = _to_fp16(model)
    parameters = sum(p.numel() for p in module.parameters())
    weight_bytes = sum(p.numel() * (2 if dtype == "fp16" else 4) for p in module.parameters())
    external = weight_bytes > external_over
    contract = {**input_contract(multiple), "dtype": dtype, "opset": str(opset), **(metadata or {})}
    del model.metadata_props[:]
    for key, value in contract.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, str(value)
    model.doc_string = "FlowSR one-step super-resolution: " + json.dumps(contract)

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".flowsr-export-", dir=folder)
    try:
        staged = os.path.join(staging, os.path.basename(path))
        data_name = os.path.basename(path) + ".data"
        onnx.save_model(model, staged, save_as_external_data=external, all_tensors_to_one_file=True,
                        location=data_name)
        inputs = [_example(multiple, grid, seed=1 + i) for i, grid in enumerate(CHECK_GRID)]
        error = max_difference(staged, module, inputs)
        if not error <= tolerance:  # NaN fails too
            raise ExportError(f"the exported graph differs from torch by {error:.3g} (> tolerance {tolerance:g}); "
                              f"nothing written to {path}")
        if external:
            os.chmod(os.path.join(staging, data_name), os.stat(staged).st_mode & 0o777)  # as readable as the graph
            os.replace(os.path.join(staging, data_name), os.path.join(folder, data_name))
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportReport(path=path, dtype=dtype, opset=opset, size_multiple=multiple, parameters=parameters,
                        external_data=external, max_error=error, tolerance=tolerance,
                        seconds=round(time.perf_counter() - start, 2))


def export_checkpoint(checkpoint: str, path: str, *, dtype: str = "fp32", opset: int = DEFAULT_OPSET,
                      tolerance: Optional[float] = None, pretrained: Optional[str] = None,
                      weights: str = "student") -> ExportReport:
    """`export_onnx` of a FlowSR checkpoint (on the CPU, fp32 weights); the checkpoint's scale and
    preset are recorded in the file's metadata."""
    from .checkpoint import load_for_inference

    backbone, cfg = load_for_inference(checkpoint, device="cpu", pretrained=pretrained, weights=weights)
    metadata = {"scale": f"{cfg.data.scale:g}", "preset": cfg.name, "backbone": cfg.model.backbone,
                "weights": weights}
    return export_onnx(backbone, path, dtype=dtype, opset=opset, tolerance=tolerance, metadata=metadata)


def read_contract(path: str) -> dict:
    """The `flowsr.*` metadata of an exported file (without the prefix); ExportError if it has none."""
    require_onnx()
    import onnx

    model = onnx.load(path, load_external_data=False)
    contract = {p.key[len(METADATA_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)}
    if "size_multiple" not in contract:
        raise ExportError(f"{path} is not a FlowSR export (no {METADATA_PREFIX}size_multiple metadata); "
                          "make one with `flowsr export CKPT OUT.onnx`")
    return contract


__all__ = ["ExportError", "ExportReport", "OneStepSR", "export_checkpoint", "export_onnx", "input_contract",
           "read_contract", "session"]
