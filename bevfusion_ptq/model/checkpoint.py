"""Checkpoint reading, strict loading, random reference-layout checkpoints.

The reference checkpoint is an mmcv checkpoint (``{"state_dict": ..., "meta": ...}``)
whose sparse-conv weights use the spconv 1.x layout ``[k0, k1, k2, Cin, Cout]``; the
model runs on spconv 2.x, whose layout is ``[Cout, k0, k1, k2, Cin]``. The conversion is
``permute(4, 0, 1, 2, 3)``, decided per tensor from shapes against the model and applied
exactly once, here, before ``load_state_dict``.

mmdet3d, when spconv 2 is installed, also patches spconv's ``_load_from_state_dict`` to
permute any sparse weight whose state-dict metadata lacks ``version: 2``. Left alone,
that is the classic double permute (or a permute of an already converted tensor). The
loader therefore hands ``load_state_dict`` the model's own metadata (version 2), which
turns that patch into a no-op: this module is the only place that converts.
"""

from __future__ import annotations

import logging
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch
from mmengine.config import Config
from torch import Tensor, nn

from ..atomic import atomic_path
from ..errors import CheckpointError
from ..stable_save import save_stable
from .builder import build_model
from .config import load_config

logger = logging.getLogger(__name__)

MODULE_PREFIX = "module."
SPCONV1 = "spconv1"  # [k0, k1, k2, Cin, Cout], the reference checkpoint
SPCONV2 = "spconv2"  # [Cout, k0, k1, k2, Cin], what the model holds
NO_SPARSE = "none"
LIST_LIMIT = 20


# --------------------------------------------------------------------------- reading
def _torch_load(path: Path, trust_pickle: bool) -> Any:
    """``torch.load`` on the CPU; restricted unpickling unless ``trust_pickle``.

    ``trust_pickle=True`` runs arbitrary code stored in the file: only for files from a
    source you trust (e.g. the reference's whole-model pickles).
    """
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    _check_format(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {path} holds objects that safe loading (weights_only) refuses: {_refused(exc)}. "
            "If you trust the file's origin, load it with trust_pickle=True "
            "(--trust-pickle), which can run code stored in the file."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, AttributeError) as exc:
        reason = str(exc) or type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {reason} (expected a file written by torch.save)") from exc


def _refused(exc: Exception) -> str:
    """The line of torch's weights_only refusal that names what was refused (it spans a page)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or [type(exc).__name__])[0].rstrip(".")


EXPECTED = "expected a PyTorch checkpoint written by torch.save (a zip archive with data.pkl, or a legacy pickle)"
_SIGNATURES = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89HDF", "an HDF5 file (Keras/TensorFlow weights?)"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"BZh", "a bzip2 archive"),
    (b"\xfd7zXZ", "an xz archive"),
    (b"%PDF", "a PDF document"),
    (b"\x7fELF", "an executable"),
    (b"ustar", "a tar archive"),
)


def _describe(head: bytes) -> str:
    """What a file that is not a checkpoint is, from its first bytes."""
    for magic, what in _SIGNATURES:
        if head.startswith(magic) or (magic == b"ustar" and head[257:262] == magic):
            return what
    if len(head) >= 10 and head[8:10] == b'{"':
        return "a safetensors file (load it with safetensors, then save a state dict with torch.save)"
    text = head.lstrip()[:1]
    if text in (b"{", b"["):
        return "a JSON or text file"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return f"an unknown binary file (starts with {head[:8].hex(' ')})"


def _check_format(path: Path) -> None:
    """Refuse, in one line, a file that cannot be a checkpoint before torch reads it.

    torch.load on such a file fails with whatever its reader trips over first (a
    ``KeyError: 101`` for a text file, an empty message for an empty one).
    """
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): {EXPECTED}")
    with open(path, "rb") as fh:
        head = fh.read(512)
    if head.startswith(b"PK\x03\x04"):
        import zipfile

        try:
            names = zipfile.ZipFile(path).namelist()
        except zipfile.BadZipFile as exc:
            raise CheckpointError(f"checkpoint {path} is a damaged or truncated zip archive ({exc}): {EXPECTED}") from None
        if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            raise CheckpointError(f"checkpoint {path} is a zip archive without data.pkl: {EXPECTED}")
        return
    if head.startswith(b"\x80"):
        return  # a pickle: the legacy torch.save format
    raise CheckpointError(f"checkpoint {path} is {_describe(head)}, not a checkpoint: {EXPECTED}")


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, Tensor], dict[str, Any], str]:
    """(state dict, meta, format) from an mmcv checkpoint, a bare state dict or a module."""
    if isinstance(obj, nn.Module):  # a pickled model (only reachable with trust_pickle)
        obj = getattr(obj, "module", obj)
        return dict(obj.state_dict()), {}, "module"
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict")
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        meta = obj.get("meta") or {}
        return dict(obj["state_dict"]), dict(meta) if isinstance(meta, Mapping) else {}, "mmcv"
    non_tensors = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if non_tensors:
        raise CheckpointError(
            f"checkpoint {path} is neither an mmcv checkpoint (no 'state_dict') nor a bare "
            f"state dict (non-tensor entries: {non_tensors[:LIST_LIMIT]})"
        )
    return dict(obj), {}, "state_dict"


def _strip_module_prefix(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], bool]:
    """Drop the ``module.`` of (Distributed)DataParallel when every key carries it."""
    if state and all(k.startswith(MODULE_PREFIX) for k in state):
        return {k[len(MODULE_PREFIX):]: v for k, v in state.items()}, True
    return state, False


def _upcast_half(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], int]:
    """fp16/bf16 tensors -> fp32: checkpoints may store half precision to stay small (the
    embedded bevfusion-tiny does), while the model and every stage after it run in fp32."""
    half = [k for k, v in state.items() if v.dtype in (torch.float16, torch.bfloat16)]
    if not half:
        return state, 0
    out = dict(state)
    for key in half:
        out[key] = state[key].float()
    return out, len(half)


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint file into (state dict without ``module.``, info).

    ``info`` holds ``format`` (mmcv / state_dict / module), ``module_prefix`` (stripped or
    not), ``upcast`` (how many fp16/bf16 tensors were restored to fp32) and ``meta`` (the
    mmcv meta dict, possibly empty).
    """
    path = Path(path)
    state, meta, fmt = _unwrap(_torch_load(path, trust_pickle), path)
    state, stripped = _strip_module_prefix(state)
    state, upcast = _upcast_half(state)
    return state, {"format": fmt, "module_prefix": stripped, "upcast": upcast, "meta": meta}


# --------------------------------------------------------------------------- sparse layout
def _spconv1_shape(spconv2_shape: tuple[int, ...]) -> tuple[int, ...]:
    cout, k0, k1, k2, cin = spconv2_shape
    return (k0, k1, k2, cin, cout)


def sparse_layout_of(shape: tuple[int, ...], expected: tuple[int, ...]) -> str:
    """Which layout a 5-D tensor of ``shape`` is in, given the model's (spconv 2) shape.

    Returns ``spconv2``, ``spconv1``, ``ambiguous`` (both layouts give that shape: only
    when all five sizes are equal) or ``mismatch``.
    """
    as_v2 = tuple(shape) == tuple(expected)
    as_v1 = tuple(shape) == _spconv1_shape(tuple(expected))
    if as_v2 and as_v1:
        return "ambiguous"
    if as_v2:
        return SPCONV2
    if as_v1:
        return SPCONV1
    return "mismatch"


def convert_sparse_weights(
    state: Mapping[str, Tensor], expected_shapes: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Bring every sparse-conv weight to the spconv 2 layout, once.

    Sparse weights are the keys whose model tensor is 5-D. The layout of the checkpoint
    is decided from the tensors whose shape tells it unambiguously; they must all agree
    (a checkpoint mixing layouts is refused). Tensors whose shape fits both layouts
    (all five sizes equal) follow that decision; if every sparse tensor is ambiguous,
    the reference layout (spconv 1) is assumed. Tensors fitting neither layout are left
    as they are and reported as wrong-shape by the strict check. The input is not
    modified; calling this on its own output changes nothing.

    Returns:
        (converted state dict, report with ``layout``, ``sparse_tensors``, ``converted``).
    """
    sparse_keys = [k for k, shape in expected_shapes.items() if len(shape) == 5 and k in state]
    verdicts = {k: sparse_layout_of(tuple(state[k].shape), tuple(expected_shapes[k])) for k in sparse_keys}
    decided = {v for v in verdicts.values() if v in (SPCONV1, SPCONV2)}
    if len(decided) > 1:
        v1 = [k for k, v in verdicts.items() if v == SPCONV1][:5]
        v2 = [k for k, v in verdicts.items() if v == SPCONV2][:5]
        raise CheckpointError(
            f"sparse conv weights mix the spconv 1.x and 2.x layouts (1.x e.g. {v1}; 2.x e.g. {v2}); "
            "refusing to guess which to permute"
        )
    if decided:
        layout = decided.pop()
    elif any(v == "ambiguous" for v in verdicts.values()):
        layout = SPCONV1
    else:
        layout = NO_SPARSE
    out = dict(state)
    converted = 0
    if layout == SPCONV1:
        for key, verdict in verdicts.items():
            if verdict in (SPCONV1, "ambiguous"):
                out[key] = state[key].permute(4, 0, 1, 2, 3).contiguous()
                converted += 1
    report = {"layout": layout, "sparse_tensors": len(sparse_keys), "converted": converted}
    return out, report


# --------------------------------------------------------------------------- strict check
def _listing(title: str, items: list[str]) -> str:
    shown = items[:LIST_LIMIT]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    body = "".join(f"\n    {item}" for item in shown)
    return f"\n  {title} ({len(items)}):{body}{more}"


def check_keys_and_shapes(
    state: Mapping[str, Tensor], expected_shapes: Mapping[str, tuple[int, ...]], source: str
) -> None:
    """Raise :class:`CheckpointError` listing missing, unexpected and wrong-shape keys."""
    missing = [k for k in expected_shapes if k not in state]
    unexpected = [k for k in state if k not in expected_shapes]
    wrong = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(shape)}"
        for k, shape in expected_shapes.items()
        if k in state and tuple(state[k].shape) != tuple(shape)
    ]
    if not (missing or unexpected or wrong):
        return
    message = (
        f"checkpoint {source} does not match the model: {len(missing)} missing, "
        f"{len(unexpected)} unexpected, {len(wrong)} wrong-shape keys"
    )
    if missing:
        message += _listing("missing", missing)
    if unexpected:
        message += _listing("unexpected", unexpected)
    if wrong:
        message += _listing("wrong shape", wrong)
    raise CheckpointError(message)


def _expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _plain(value: Any) -> Any:
    """Meta values reduced to JSON-able primitives for the summary."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value)


# --------------------------------------------------------------------------- public API
def load_checkpoint(model: nn.Module, path: str | Path, *, trust_pickle: bool = False) -> dict[str, Any]:
    """Load a checkpoint strictly into ``model``.

    Accepts an mmcv checkpoint, a bare state dict, a ``module.`` prefix, and sparse
    weights in either spconv layout (converted once, see :func:`convert_sparse_weights`).
    Keys and shapes are checked before anything is copied.

    Args:
        model: the built model.
        path: checkpoint file.
        trust_pickle: allow full unpickling. UNSAFE: a checkpoint can run arbitrary code
            when unpickled; only for files from a trusted source. Default: weights only.

    Returns:
        Summary: ``path``, ``format``, ``module_prefix``, ``upcast_to_fp32`` (fp16 tensors
        restored to fp32), ``num_keys``, ``num_parameters``
        (elements of the model's parameters), ``sparse_layout`` found (spconv1 / spconv2 /
        none), ``sparse_tensors``, ``sparse_converted`` and ``meta``.

    Raises:
        CheckpointError: missing/unreadable file, or any key/shape mismatch.
    """
    path = Path(path)
    state, info = read_checkpoint(path, trust_pickle=trust_pickle)
    return _load_state(model, state, info, path)


def _load_state(model: nn.Module, state: dict[str, Tensor], info: dict[str, Any], path: Path) -> dict[str, Any]:
    """:func:`load_checkpoint` on an already-read file (so callers never read it twice)."""
    model_state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in model_state.items()}
    state, report = convert_sparse_weights(state, expected)
    check_keys_and_shapes(state, expected, str(path))
    ordered = OrderedDict(state)
    # The model's own metadata (sparse modules: version 2) keeps mmdet3d's spconv patch
    # from permuting a second time.
    ordered._metadata = getattr(model_state, "_metadata", OrderedDict())  # type: ignore[attr-defined]
    model.load_state_dict(ordered, strict=True)
    summary = {
        "path": str(path),
        "format": info["format"],
        "module_prefix": info["module_prefix"],
        "upcast_to_fp32": info.get("upcast", 0),
        "num_keys": len(state),
        "num_parameters": _count_parameters(model),
        "sparse_layout": report["layout"],
        "sparse_tensors": report["sparse_tensors"],
        "sparse_converted": report["converted"],
        "meta": _plain(info["meta"]),
    }
    logger.info(
        "loaded %s: %d keys, %d parameters, sparse layout %s (%d converted)",
        path, summary["num_keys"], summary["num_parameters"], report["layout"], report["converted"],
    )
    return summary


def _resolve_config(cfg: Config | str) -> Config:
    return load_config(cfg) if isinstance(cfg, (str, Path)) else cfg


def load_model(cfg: Config | str, checkpoint_path: str | Path, *, trust_pickle: bool = False) -> nn.Module:
    """Build the config's model on the CPU, load the checkpoint strictly, return it in eval mode.

    The file is read and its keys and shapes are checked against a model built on the
    meta device first, so a wrong file fails in a second, before the real model is built.
    ``trust_pickle`` as in :func:`load_checkpoint` (unsafe).
    """
    cfg = _resolve_config(cfg)
    path = Path(checkpoint_path)
    state, info = read_checkpoint(path, trust_pickle=trust_pickle)
    with torch.device("meta"):
        expected = _expected_shapes(build_model(cfg))
    converted, _ = convert_sparse_weights(state, expected)
    check_keys_and_shapes(converted, expected, str(path))
    del converted
    model = build_model(cfg)
    _load_state(model, state, info, path)
    return model.eval()


def inspect_checkpoint(path: str | Path, cfg: Config | str, *, trust_pickle: bool = False) -> dict[str, Any]:
    """Load ``path`` strictly into the config's model on the CPU and summarise it.

    For ``bevfusion-ptq inspect-checkpoint``: run before spending GPU time. Raises
    :class:`CheckpointError` with the key listing on any mismatch.
    """
    cfg = _resolve_config(cfg)
    model = build_model(cfg)
    summary = load_checkpoint(model, path, trust_pickle=trust_pickle)
    summary["config"] = str(cfg.get("name", ""))
    return summary


def _randomize_norm_stats(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BN affine parameters and running statistics.

    Fresh BN layers have weight 1, bias 0, mean 0, var 1, which makes BN folding a no-op
    and hides folding bugs; these values make it count.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            with torch.no_grad():
                if module.weight is not None:
                    module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                    module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                if module.running_mean is not None:
                    module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                    module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                    module.num_batches_tracked.fill_(1000)


def to_reference_layout(
    state: Mapping[str, Tensor], expected_shapes: Mapping[str, tuple[int, ...]]
) -> "OrderedDict[str, Tensor]":
    """Model state (spconv 2) -> reference layout: sparse weights as ``[k0, k1, k2, Cin, Cout]``."""
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in state.items():
        if len(expected_shapes.get(key, ())) == 5:
            value = value.permute(1, 2, 3, 4, 0)
        out[key] = value.detach().clone().contiguous()
    return out


def make_checkpoint(path: str | Path, cfg: Config | str, seed: int = 0) -> dict[str, Any]:
    """Write a random-weight checkpoint in the reference layout.

    An mmcv dict (``state_dict`` + ``meta``) with spconv 1.x sparse weights, like the
    reference file, so tests and dry runs exercise the real loading path. Weights are
    the modules' own initialisation under ``seed``; BN statistics are randomised (see
    :func:`_randomize_norm_stats`). Same seed and config -> same tensors.

    Returns:
        ``path``, ``num_keys``, ``num_parameters``, ``sparse_layout`` (spconv1), ``seed``.
    """
    cfg = _resolve_config(cfg)
    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(cfg)
        generator = torch.Generator().manual_seed(seed)
        _randomize_norm_stats(model, generator)
    state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    checkpoint = {
        "state_dict": to_reference_layout(state, expected),
        "meta": {
            "generator": "bevfusion_ptq.model.make_checkpoint",
            "config": str(cfg.get("name", "")),
            "seed": int(seed),
            "sparse_layout": SPCONV1,
        },
    }
    with atomic_path(path) as partial:
        # Given a path, torch.save names the zip's folder after that (temporary, PID-bearing)
        # name, which would change the file's sha256, the run's keys and its version.
        save_stable(checkpoint, partial)
    summary = {
        "path": str(path),
        "num_keys": len(state),
        "num_parameters": _count_parameters(model),
        "sparse_layout": SPCONV1,
        "seed": int(seed),
    }
    logger.info("wrote random checkpoint %s (%d keys, seed %d)", path, len(state), seed)
    return summary
