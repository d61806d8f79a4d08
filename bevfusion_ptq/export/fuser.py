"""fuser.onnx: ConvFuser + the BEV decoder (SECOND + SECONDFPN), output ``middle``.

One graph for both because the runtime hands the fused map straight to the decoder; the
deconv of ``decoder.neck.deblocks.0.0`` stays float (its quantizer is one of the two
excluded ones) and the concatenation carries no Q/DQ.
"""

from __future__ import annotations

from torch import Tensor, nn

from bevfusion_ptq.model.bevfusion import _first


class FuserGraph(nn.Module):
    """``camera`` ``[1, Cc, X, Y]``, ``lidar`` ``[1, Cl, X, Y]`` -> ``middle`` (decoder output)."""

    input_names = ("camera", "lidar")
    output_names = ("middle",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.fuser = model.fuser
        self.backbone = model.decoder["backbone"]
        self.neck = model.decoder["neck"]

    def forward(self, camera: Tensor, lidar: Tensor) -> Tensor:
        return _first(self.neck(self.backbone(self.fuser([camera, lidar]))))
