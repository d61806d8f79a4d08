"""The bevfusion-r50 model has exactly the reference checkpoint's keys and shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import bevfusion_ptq.model as bm

TSV = Path(bm.__file__).resolve().parent / "reference" / "bevfusion_r50_state_dict.tsv"


def _reference_table() -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) rows of the TSV, sparse weights converted to the spconv 2 layout."""
    rows = []
    for line in TSV.read_text().splitlines():
        if not line.strip():
            continue
        key, shape_text = line.split("\t")
        shape = tuple(int(v) for v in shape_text.strip("[]").split(",") if v.strip())
        if len(shape) == 5:  # [k0, k1, k2, Cin, Cout] -> [Cout, k0, k1, k2, Cin]
            shape = (shape[4], *shape[:4])
        rows.append((key, shape))
    return rows


def test_r50_state_dict_matches_reference_table() -> None:
    reference = _reference_table()
    assert len(reference) == 713
    with torch.device("meta"):
        model = bm.build_model(bm.load_config("bevfusion-r50"))
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]

    ref_keys = [k for k, _ in reference]
    our_keys = [k for k, _ in ours]
    missing = sorted(set(ref_keys) - set(our_keys))
    extra = sorted(set(our_keys) - set(ref_keys))
    assert not missing and not extra, f"missing {missing[:20]}, extra {extra[:20]}"
    ref_shapes = dict(reference)
    wrong = [(k, s, ref_shapes[k]) for k, s in ours if s != ref_shapes[k]]
    assert not wrong, f"wrong shapes (key, ours, reference): {wrong[:20]}"
    assert our_keys == ref_keys, "same keys, different registration order"


def test_r50_reference_geometry() -> None:
    """The non-trainable geometry parameters carry the reference grid."""
    model = bm.build_model("bevfusion-r50")  # on the CPU: the values are checked
    vt = model.encoders.camera.vtransform
    assert vt.nx.tolist() == [360, 360, 1]
    assert torch.allclose(vt.dx, torch.tensor([0.3, 0.3, 20.0]))
    assert torch.allclose(vt.bx, torch.tensor([-53.85, -53.85, 0.0]))
    assert tuple(vt.frustum.shape) == (118, 32, 88, 3)
    assert vt.frustum[0, 0, -1].tolist() == [703.0, 0.0, 1.0]
    assert vt.frustum[-1, -1, 0].tolist() == [0.0, 255.0, 59.5]


def test_reference_layout_state_passes_the_strict_check() -> None:
    """A state dict shaped exactly like the TSV (spconv 1.x sparse weights) converts once
    and then matches the model: what the real reference file will go through."""
    from bevfusion_ptq.model.checkpoint import check_keys_and_shapes, convert_sparse_weights

    state = {}
    for line in TSV.read_text().splitlines():
        key, shape_text = line.split("\t")
        shape = [int(v) for v in shape_text.strip("[]").split(",") if v.strip()]
        state[key] = torch.empty(shape, device="meta")
    with torch.device("meta"):
        model = bm.build_model("bevfusion-r50")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    converted, report = convert_sparse_weights(state, expected)
    assert report == {"layout": "spconv1", "sparse_tensors": 21, "converted": 21}
    check_keys_and_shapes(converted, expected, "reference-table")


def test_packaged_table_is_the_shared_reference() -> None:
    """The table ships with the package (tests run anywhere); it must stay the shared one."""
    shared = Path(__file__).resolve().parents[2] / "shared" / "reference" / "bevfusion_r50_state_dict.tsv"
    if not shared.is_file():
        pytest.skip(f"no shared reference beside the checkout ({shared})")
    assert TSV.read_bytes() == shared.read_bytes()
