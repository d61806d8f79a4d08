"""deploy.md: which file goes where in CUDA-BEVFusion, and how each engine is built.

Written from the files actually exported (names, shapes, Q/DQ counts), so the document and
the files cannot disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bevfusion_ptq.export.deployment import GraphInfo

#: trtexec precision flags per engine and precision (tool/build_trt_engine.sh's choices)
FLAGS: dict[str, dict[str, str]] = {
    "int8": {
        "camera.backbone": "--fp16 --int8",
        "camera.vtransform": "--fp16",
        "fuser": "--fp16 --int8",
        "head.bbox": "--fp16",
        "head.bbox.layernormplugin": "--fp16 --plugins=<the runtime's LayerNorm plugin library>",
    },
    "fp16": {
        "camera.backbone": "--fp16",
        "camera.vtransform": "--fp16",
        "fuser": "--fp16",
        "head.bbox": "--fp16",
        "head.bbox.layernormplugin": "--fp16 --plugins=<the runtime's LayerNorm plugin library>",
    },
}
_FOLDER = {"int8": "resnet50int8", "fp16": "resnet50"}
_ENGINE = {"head.bbox.layernormplugin": "head.bbox"}


def _shape(shapes: dict[str, list[int]]) -> str:
    return ", ".join(f"`{k}` {v}" for k, v in shapes.items())


def render(files: Sequence["GraphInfo"], *, model_name: str) -> str:
    precisions = sorted({f.precision for f in files}, key=["int8", "fp16"].index)
    lines = [
        f"# Deploying {model_name} with CUDA-BEVFusion",
        "",
        "These files are the inputs of NVIDIA's CUDA-BEVFusion runtime (Lidar_AI_Solution). Four are",
        "TensorRT graphs (opset 13, static shapes, Q/DQ from the calibrated quantizers); the lidar",
        "backbone is the \"scn\" description that libspconv parses directly (no engine to build).",
        "",
        "## Where the files go",
        "",
        "Copy one set into the runtime's model folder (`CUDA-BEVFusion/model/<name>/`), then build",
        "every TensorRT graph into `model/<name>/build/<graph>.plan` (the runtime loads them by",
        "these names):",
        "",
    ]
    for precision in precisions:
        folder = _FOLDER[precision]
        lines += [f"### `onnx_{precision}/` -> `model/{folder}/` (`{precision}` set)", "",
                  "| file | inputs | outputs | nodes | Q/DQ pairs | build |", "|---|---|---|---|---|---|"]
        for f in files:
            if f.precision != precision:
                continue
            stem = f.name.removesuffix(".onnx")
            engine = _ENGINE.get(stem, stem)  # the plugin head replaces head.bbox's engine
            build = "parsed by libspconv at start-up" if stem.startswith("lidar") else (
                f"`trtexec --onnx=model/{folder}/{f.name} --saveEngine=model/{folder}/build/{engine}.plan "
                f"{FLAGS[precision][stem]} --inputIOFormats=fp16:chw --outputIOFormats=fp16:chw`"
            )
            pairs = min(f.quantize, f.dequantize)
            lines.append(f"| `{f.name}` | {_shape(f.inputs)} | {_shape(f.outputs)} | {f.nodes} | {pairs} | {build} |")
        lines.append("")
    lines += [
        "## Which head",
        "",
        "- `head.bbox.onnx` writes LayerNorm as plain ONNX operators. TensorRT 8.6 and newer fuse",
        "  them into their native normalization layer: build it as above, no plugin. Use this one.",
        "- `head.bbox.layernormplugin.onnx` writes each LayerNorm as one `CustomLayerNormalization`",
        "  node (domain `nv`, attributes `axis`=-1, `epsilon`), the runtime's LayerNorm plugin. Only",
        "  for TensorRT older than 8.6: pass the plugin library with `--plugins`; its engine",
        "  replaces `build/head.bbox.plan` (build one of the two heads, not both).",
        "",
        "## Precision",
        "",
        "- camera.backbone and fuser carry Q/DQ: build them with `--int8 --fp16` so TensorRT runs the",
        "  quantized convolutions in INT8 and the rest in FP16. camera.vtransform and the head have no",
        "  quantizers and build FP16. The graphs are written in float32; TensorRT chooses the precision.",
        "- The lidar graph gives each layer its precision: `conv_input` runs FP16, every other",
        "  convolution INT8 with the ranges in the file, `conv_out` outputs FP16. The runtime's",
        "  `build()` precision argument overrides these per-layer settings.",
        "- `onnx_fp16/` (when exported) is the same network with every quantizer off, for A/B runs.",
        "",
        "Runtime inputs: `img` is the normalized camera images, `depth` the lidar range image per",
        "camera (0 where no point); voxel features, indices (b, x, y, z) and the grid come through",
        "libspconv's engine API. Box decoding (score threshold, centre range) is the runtime's.",
        "",
    ]
    return "\n".join(lines)


def write_deploy_md(path: Path, files: Sequence["GraphInfo"], *, model_name: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(files, model_name=model_name))
    return path
