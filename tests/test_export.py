"""The deployment ONNX set on bevfusion-tiny, proven by consumers we can run.

Structure (onnx.checker, static shapes, Q/DQ counts and scales), ONNX Runtime against the
PyTorch fake-quant model per graph, the lidar "scn" graph through our interpreter (with
mutations that must break it), and the assembled chain's boxes against the PyTorch INT8 model.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from pytorch_quantization.nn import TensorQuantizer
from spconv.pytorch.conv import SparseConvolution

from bevfusion_ptq.export import camera, export_deployment, set_dir
from bevfusion_ptq.export.common import qdq_census
from bevfusion_ptq.export.deployment import BACKBONE, FILES, FUSER, HEAD, HEAD_PLUGIN, SCN, VTRANSFORM, sample_inputs
from bevfusion_ptq.export.fuser import FuserGraph
from bevfusion_ptq.export.head import OUTPUTS, HeadGraph
from bevfusion_ptq.export.lidar import check_scn
from bevfusion_ptq.quant.fidelity import compare_tensors, match_boxes
from bevfusion_ptq.quant.report import quantizer_status
from bevfusion_ptq.quant.rules import BEVFUSION_SHARE
from tests.export_helpers import calibrated_tiny, lidar_voxels, run, run_chain, session
from tests.model_helpers import torch_threads
from tests.scn_interpreter import ScnInterpreter

#: which quantizers (status-table names) each INT8 graph carries
PARTS = {
    BACKBONE: ("encoders.camera.backbone.", "encoders.camera.neck.", "encoders.camera.vtransform.dtransform.",
               "encoders.camera.vtransform.depthnet."),
    FUSER: ("fuser.", "decoder."),
    VTRANSFORM: (),
    HEAD: (),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Calibrated tiny, exported once (INT8 set)."""
    with torch_threads(1):
        cfg, model, batches = calibrated_tiny()
        out = tmp_path_factory.mktemp("deploy")
        written = export_deployment(model, batches[0], out, ["int8"], model_name="bevfusion-tiny")
        yield cfg, model, batches, out / set_dir("int8"), written


def _enabled_amax(model, prefixes) -> list[np.ndarray]:
    rows = quantizer_status(model, "max", BEVFUSION_SHARE)
    return [np.asarray(r.amax, dtype=np.float32).reshape(-1) for r in rows
            if r.enabled and any(n.startswith(prefixes) for n in r.names)] if prefixes else []


def test_all_files_pass_structural_checks(exported):
    _, model, _, folder, written = exported
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    for name in (BACKBONE, VTRANSFORM, FUSER, HEAD, HEAD_PLUGIN):
        graph = onnx.load(str(folder / name))
        onnx.checker.check_model(graph, full_check=True)
        assert {o.domain: o.version for o in graph.opset_import}[""] == 13
        for value in list(graph.graph.input) + list(graph.graph.output):
            dims = value.type.tensor_type.shape.dim
            assert dims and all(d.dim_value > 0 and not d.dim_param for d in dims), (name, value.name)
    check_scn(onnx.load(str(folder / SCN)))
    doc = (folder.parent / "deploy.md").read_text()
    assert all(f"`{name}`" in doc for name in FILES) and "model/resnet50int8/" in doc
    assert "build/camera.backbone.plan --fp16 --int8" in doc and "build/head.bbox.plan --fp16 --input" in doc
    shapes = {(w.name, k): v for w in written for k, v in {**w.inputs, **w.outputs}.items()}
    vt = model.encoders["camera"]["vtransform"]
    fh, fw = vt.feature_size
    assert shapes[(BACKBONE, "img")] == [1, 6, 3, *vt.image_size]
    assert shapes[(BACKBONE, "depth")] == [1, 6, 1, *vt.image_size]
    assert shapes[(BACKBONE, "camera_feature")] == [6, fh, fw, vt.out_channels]  # NHWC
    assert shapes[(BACKBONE, "camera_depth_weights")] == [6, vt.depth_bins, fh, fw]
    assert [k for (n, k) in shapes if n == HEAD] == ["middle", *OUTPUTS]
    proposals = model.heads["object"].num_proposals
    assert shapes[(HEAD, "score")] == [1, 10, proposals] and shapes[(HEAD, "reg")] == [1, 2, proposals]


def _quantizer_calls(model, name, batch) -> int:
    """How many times the PyTorch graph applies an enabled quantizer (forward pre-hooks)."""
    graph = _pytorch_graphs(model)[name]
    x = sample_inputs(model, batch)
    args = {BACKBONE: (x.img, x.depth), FUSER: (x.camera_bev, x.lidar_bev)}[name]
    calls = []
    hooks = [m.register_forward_pre_hook(lambda m, i: calls.append(m) and None) for m in graph.modules()
             if isinstance(m, TensorQuantizer) and not m._disabled]
    try:
        with torch.no_grad():
            graph(*args)
    finally:
        for h in hooks:
            h.remove()
    return len(calls)


def test_qdq_pairs_and_scales_follow_the_status_table(exported):
    _, model, batches, folder, written = exported
    for name, prefixes in PARTS.items():
        census = qdq_census(onnx.load(str(folder / name)))
        expected = _enabled_amax(model, prefixes)
        assert census.quantize == census.dequantize, name
        # one distinct scale per enabled quantizer of that part, each amax/127
        assert len(census.scales) == len(expected), (name, len(census.scales), len(expected))
        order = lambda a: (a.size, a.tolist())  # noqa: E731
        got = sorted((np.asarray(s, dtype=np.float32) for s in census.scales), key=order)
        want = sorted((a / np.float32(127.0) for a in expected), key=order)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-6, err_msg=name)
        calls = _quantizer_calls(model, name, batches[0]) if expected else 0
        # A shared quantizer (residual identity, concat inputs, the layer3/layer4 share groups)
        # is applied to several tensors and emits a pair per application; the tracer merges the
        # odd identical pair on one tensor.
        assert len(expected) <= census.pairs <= calls, (name, census.pairs, calls)
        print(f"{name}: {census.pairs} Q/DQ pairs ({calls} quantizer applications), "
              f"{len(census.scales)} distinct scales = {len(expected)} enabled quantizers")
    # The excluded deblock keeps no Q/DQ: its weight scale is nowhere in fuser.onnx.
    deblock = model.get_submodule("decoder.neck.deblocks.0.0")
    assert deblock._weight_quantizer._disabled and deblock._input_quantizer._disabled
    fuser_scales = {np.asarray(s, dtype=np.float32).tobytes() for s in qdq_census(onnx.load(str(folder / FUSER))).scales}
    assert (deblock._weight_quantizer._amax.float().reshape(-1).numpy() / 127.0).astype(np.float32).tobytes() not in fuser_scales


def _pytorch_graphs(model):
    return {
        BACKBONE: camera.CameraBackboneGraph(model),
        VTRANSFORM: camera.VTransformGraph(model),
        FUSER: FuserGraph(model),
        HEAD: HeadGraph(model),
    }


# ONNX Runtime runs each Q/DQ pair as float ops here (see ``session``), the fake-quant model
# quantizes in PyTorch. Both use the same scales and round half to even, so they differ only
# where float32 reassociation moves a value across an INT8 rounding boundary (one step,
# amax/127) and where that propagates (measured: backbone rel-L2 1.1e-2, fuser under 1e-3); a
# graph with no Q/DQ differs by float32 reassociation alone.
TOLERANCE = {  # (min cosine, max relative L2)
    BACKBONE: (0.9995, 0.03),
    FUSER: (0.9995, 0.03),
    VTRANSFORM: (0.99999, 1e-4),
    HEAD: (0.99999, 1e-4),
}


def test_onnx_runtime_matches_pytorch_fake_quant(exported):
    """Every graph, as ONNX Runtime runs it, against the PyTorch module it was traced from.

    Q/DQ run as float ops here (see ``session``): the comparison is of the graph, on any CPU.
    The INT8-kernel session must still run the same files to a close answer.
    """
    _, model, batches, folder, _ = exported
    graphs = _pytorch_graphs(model)
    sessions = {name: session(folder / name, float_qdq=True) for name in graphs}
    fused = session(folder / BACKBONE)
    with torch_threads(1), torch.no_grad():
        for index, batch in enumerate(batches):
            x = sample_inputs(model, batch)
            feeds = {
                BACKBONE: {"img": x.img, "depth": x.depth},
                VTRANSFORM: {"feat_in": x.feat_in},
                FUSER: {"camera": x.camera_bev, "lidar": x.lidar_bev},
                HEAD: {"middle": x.middle},
            }
            pytorch = {}
            for name, graph in graphs.items():
                expected = graph(*feeds[name].values())
                expected = pytorch[name] = (expected,) if isinstance(expected, torch.Tensor) else expected
                got = run(sessions[name], **feeds[name])
                if name == HEAD:
                    expected = _in_runtime_order(got, dict(zip(graph.output_names, expected)))
                for out_name, want in zip(graph.output_names, expected):
                    cos, rel = compare_tensors(got[out_name], want.float())
                    print(f"batch {index} {name} {out_name}: cosine {cos:.6f} rel-L2 {rel:.2e}")
                    min_cos, max_rel = TOLERANCE[name]
                    assert cos >= min_cos and rel <= max_rel, (name, out_name, cos, rel)
            int8 = run(fused, **feeds[BACKBONE])
            cos, _ = compare_tensors(int8["camera_feature"], pytorch[BACKBONE][0].float())
            print(f"batch {index} {BACKBONE} camera_feature, INT8 kernels: cosine {cos:.6f}")
            assert cos >= 0.99


def _in_runtime_order(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The head's per-proposal outputs of PyTorch, put in the order ONNX Runtime returned them.

    The head keeps its top-k heatmap peaks in score order. Peaks whose heatmap scores tie to
    within float32 noise (random weights make many: about 1e-6 apart, while the two runtimes
    differ by about 3e-7) can come out in another order. Each runtime proposal is matched to
    the PyTorch proposal with the nearest output vector; the match must be one-to-one, and the
    caller's tolerance then holds for every matched pair.
    """
    def per_proposal(outputs: dict[str, torch.Tensor]) -> torch.Tensor:  # [proposals, all channels]
        return torch.cat([outputs[name][0].float() for name in OUTPUTS], dim=0).T

    order = torch.cdist(per_proposal(got).double(), per_proposal(expected).double()).argmin(dim=1)
    assert sorted(order.tolist()) == list(range(len(order))), "the runtimes' proposals do not match one-to-one"
    return [value[..., order] for value in expected.values()]


def _as_opset17_layernorm(graph: onnx.ModelProto) -> onnx.ModelProto:
    """The plugin head with each CustomLayerNormalization node replaced by ONNX's own
    LayerNormalization (opset 17), taking the node's inputs and attributes as they are."""
    g = copy.deepcopy(graph)
    nodes = []
    for node in g.graph.node:
        if node.op_type == "CustomLayerNormalization":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            nodes.append(helper.make_node("LayerNormalization", list(node.input), list(node.output),
                                          axis=attrs["axis"], epsilon=attrs["epsilon"]))
        else:
            nodes.append(node)
    del g.graph.node[:]
    g.graph.node.extend(nodes)
    del g.opset_import[:]
    g.opset_import.extend([helper.make_opsetid("", 17)])
    return g


def test_plugin_layernorm_head(exported, tmp_path):
    _, model, batches, folder, _ = exported
    graph = onnx.load(str(folder / HEAD_PLUGIN))
    custom = [n for n in graph.graph.node if n.op_type == "CustomLayerNormalization"]
    norms = [m for m in model.heads["object"].modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(custom) == len(norms) > 0
    for node in custom:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert node.domain == "nv" and attrs["axis"] == -1 and attrs["epsilon"] == pytest.approx(norms[0].eps)
        assert len(node.input) == 3
    plain = onnx.load(str(folder / HEAD))
    assert not [n for n in plain.graph.node if n.domain]
    rewritten = tmp_path / "head17.onnx"
    onnx.save(_as_opset17_layernorm(graph), str(rewritten))
    middle = sample_inputs(model, batches[1]).middle
    a = run(session(folder / HEAD), middle=middle)
    b = run(session(rewritten), middle=middle)
    for name in OUTPUTS:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ lidar
def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_scn_graph_structure(exported):
    _, model, _, folder, _ = exported
    graph = onnx.load(str(folder / SCN))
    backbone = model.encoders["lidar"]["backbone"]
    convs = [m for m in backbone.modules() if isinstance(m, SparseConvolution)]
    ops = [n.op_type for n in graph.graph.node]
    blocks = sum(1 for m in backbone.modules() if type(m).__name__.endswith("SparseBasicBlock"))
    assert ops.count("SparseConvolution") == len(convs)
    assert ops.count("Add") == ops.count("Relu") == blocks
    assert ops[-3:] == ["ScatterDense", "Transpose", "Reshape"]
    assert graph.graph.name == "scn" and graph.opset_import[0].version == 11
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    # Relu only after Add: a conv's ReLU is its activation.
    producers = {o: n for n in graph.graph.node for o in n.output}
    for node in graph.graph.node:
        if node.op_type == "Relu":
            assert producers[node.input[0]].op_type == "Add"
    conv_nodes = [n for n in graph.graph.node if n.op_type == "SparseConvolution"]
    inits = {t.name: t for t in graph.graph.initializer}
    for node, conv in zip(conv_nodes, convs):
        a = _attrs(node)
        assert a["subm"] == int(conv.subm)
        if conv.indice_key is not None:
            assert a["rulebook"].decode() == conv.indice_key
        w = inits[node.input[1]]
        assert w.data_type == onnx.TensorProto.FLOAT16 and node.input[2] in inits
        np.testing.assert_array_equal(numpy_helper.to_array(w), conv.weight.detach().numpy().astype(np.float16))
        assert a["input_dynamic_range"] == pytest.approx(float(conv._input_quantizer.amax), rel=1e-6)
        np.testing.assert_allclose(a["weight_dynamic_ranges"], conv._weight_quantizer.amax.reshape(-1).numpy(), rtol=1e-6)
    first, last = _attrs(conv_nodes[0]), _attrs(conv_nodes[-1])
    assert first["precision"] == b"fp16" and first["output_precision"] == b"int8"
    assert last["output_precision"] == b"fp16" and last["activation"] == b"ReLU"
    assert all(_attrs(n)["precision"] == b"int8" for n in conv_nodes[1:])
    relu_convs = [p for p, m in backbone.named_modules() if getattr(m, "act_type", None) is not None
                  and str(m.act_type).endswith("ReLU")]
    assert sum(_attrs(n)["activation"] == b"ReLU" for n in conv_nodes) == len(relu_convs)
    # Rulebooks: subm convs of one resolution share one key; strided convs have their own.
    keys = [(_attrs(n)["rulebook"], tuple(_attrs(n)["input_spatial_shape"]), _attrs(n)["subm"]) for n in conv_nodes]
    subm_keys = {(k, s) for k, s, m in keys if m}
    assert len({k for k, _ in subm_keys}) == len({s for _, s in subm_keys}) == len(subm_keys)  # one key per resolution
    strided = [k for k, _, m in keys if not m]
    assert len(set(strided)) == len(strided) and not set(strided) & {k for k, _ in subm_keys}
    out = [d.dim_value for d in graph.graph.output[0].type.tensor_type.shape.dim]
    with torch.no_grad():
        bev = model.extract_lidar_features(exported[2][0]["points"])
    assert out == list(bev.shape)  # [1, C*Z, X, Y] derived from the model, tiny or r50


@pytest.fixture(scope="module")
def fp16_weights(exported):
    """The calibrated model with its sparse weights and biases rounded to float16, as the scn
    file stores them (and libspconv runs them): the interpreter's exact reference."""
    model = copy.deepcopy(exported[1])
    with torch.no_grad():
        for m in model.encoders["lidar"]["backbone"].modules():
            if isinstance(m, SparseConvolution):
                m.weight.copy_(m.weight.half().float())
                m.bias.copy_(m.bias.half().float())
    return model


def _agreement(model, graph, batch) -> tuple[float, float]:
    """(cosine, relative L2) of the interpreter's lidar BEV against the PyTorch model's."""
    feats, coords, batch_size = lidar_voxels(model, batch)
    with torch.no_grad():
        want = model.extract_lidar_features(batch["points"])
        got = ScnInterpreter(graph)(feats, coords, batch_size)
    return compare_tensors(got, want)


# Against the float16-weight model the interpreter computes the same sums in the same order
# (spconv, the same fake quantization), so it must agree to float32 rounding; against the
# float32 model the float16 weights alone cost about 1e-2 relative L2 on bevfusion-tiny.
# The exact reference is what makes the mutations visible: the random-weight tiny lidar BEV is
# dominated by the folded BN biases, so a one-layer fault moves it by 6e-3 to 1e-2, about as
# much as the float16 rounding does, far above the exact match's 0.
EXACT_REL_L2 = 1e-5


def test_interpreter_reproduces_pytorch_lidar_bev(exported, fp16_weights):
    _, model, batches, folder, _ = exported
    graph = onnx.load(str(folder / SCN))
    with torch_threads(1):
        for index, batch in enumerate(batches):
            cos, rel = _agreement(fp16_weights, graph, batch)
            cos32, rel32 = _agreement(model, graph, batch)
            print(f"batch {index} lidar BEV, interpreter vs PyTorch: float16 weights cosine {cos:.8f} rel-L2 "
                  f"{rel:.2e}; float32 weights cosine {cos32:.6f} rel-L2 {rel32:.2e}")
            assert rel <= EXACT_REL_L2
            assert cos32 >= 0.9999 and rel32 <= 0.03


def _set(node, name, value):
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    if value is not None:
        node.attribute.append(helper.make_attribute(name, value))


def _mutate(graph, what):
    g = copy.deepcopy(graph)
    convs = [n for n in g.graph.node if n.op_type == "SparseConvolution"]
    subm = [n for n in convs if _attrs(n)["subm"] == 1]
    relu = [n for n in convs if _attrs(n)["activation"] == b"ReLU"]
    inits = {t.name: t for t in g.graph.initializer}
    if what == "subm-missing":
        _set(subm[1], "subm", None)
    elif what == "activation-missing":
        _set(relu[1], "activation", None)
    elif what == "activation-none":
        for n in relu:
            _set(n, "activation", "None")
    elif what == "conv_input-precision-int8":
        _set(convs[0], "precision", "int8")
    elif what == "precision-missing":
        _set(convs[1], "precision", None)
    elif what == "conv_out-output-int8":
        _set(convs[-1], "output_precision", "int8")
    elif what == "input-range-scaled":
        _set(convs[2], "input_dynamic_range", _attrs(convs[2])["input_dynamic_range"] * 0.25)
    elif what == "weight-range-as-scale":
        _set(convs[2], "weight_dynamic_ranges", [r / 127.0 for r in _attrs(convs[2])["weight_dynamic_ranges"]])
    elif what == "weight-layout-zyx":
        for n in convs:
            t = inits[n.input[1]]
            arr = numpy_helper.to_array(t)
            if arr.shape[1] == arr.shape[3]:
                t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr.transpose(0, 3, 2, 1, 4)), t.name))
    elif what == "weight-layout-spconv1":
        t = inits[convs[1].input[1]]
        arr = numpy_helper.to_array(t)
        # spconv 1.x [k0, k1, k2, Cin, Cout] bytes written without the permute, read as [Cout, k, k, k, Cin]
        spconv1 = np.ascontiguousarray(arr.transpose(1, 2, 3, 4, 0))
        t.CopyFrom(numpy_helper.from_array(spconv1.reshape(arr.shape), t.name))
    else:
        raise ValueError(what)
    return g


MUTATIONS = [
    "subm-missing", "activation-missing", "activation-none", "conv_input-precision-int8", "precision-missing",
    "conv_out-output-int8", "input-range-scaled", "weight-range-as-scale", "weight-layout-zyx",
    "weight-layout-spconv1",
]


@pytest.mark.parametrize("what", MUTATIONS)
def test_interpreter_catches_a_broken_scn_file(exported, fp16_weights, what):
    _, _, batches, folder, _ = exported
    graph = _mutate(onnx.load(str(folder / SCN)), what)
    with torch_threads(1):
        try:
            cos, rel = _agreement(fp16_weights, graph, batches[0])
        except (ValueError, RuntimeError, AssertionError) as exc:  # spconv asserts on a bad rulebook
            print(f"{what}: refused ({type(exc).__name__}: {exc})")
            return
    print(f"{what}: cosine {cos:.6f} rel-L2 {rel:.2e}")
    assert rel > EXACT_REL_L2, f"{what} went unnoticed (cosine {cos}, rel-L2 {rel})"


# ------------------------------------------------------------------------------------ chain
def test_assembled_chain_boxes_match_pytorch_int8(exported):
    _, model, batches, folder, _ = exported
    matched = considered = 0
    with torch_threads(1):
        for index, batch in enumerate(batches):
            chain = run_chain(folder, model, batch)
            with torch.no_grad():
                reference = model(batch)
            for name in ("camera_bev", "lidar_bev"):
                cos, rel = compare_tensors(chain[name], reference[name])
                print(f"batch {index} chain {name}: cosine {cos:.6f} rel-L2 {rel:.2e}")
            for want, got in zip(reference["boxes"], chain["boxes"]):
                m, c = match_boxes(want, got)
                matched, considered = matched + m, considered + c
    agreement = matched / considered
    print(f"chain box agreement: {matched}/{considered} = {agreement:.3f}")
    assert considered > 0 and agreement >= 0.95
