"""TransFusion detection head: heatmap peaks become queries, one transformer decoder
layer refines them against the BEV map, small FFNs regress the boxes.

Written here because mmdet3d 1.x ships it only in its ``projects/`` folder (not in the
wheel) and under different key names. Names follow ``torch.nn.MultiheadAttention`` /
``TransformerDecoderLayer`` (``self_attn``, ``multihead_attn``, ``linear1/2``,
``norm1..3``), as the reference checkpoint does.

Layout: the BEV input is ``[B, C, X, Y]`` (dim -2 is x). Query positions are in BEV-cell
units, channel 0 = x (row index + 0.5), channel 1 = y (column index + 0.5), so the
decoded centre is ``position * out_size_factor * voxel_size + range_min`` per axis.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmdet3d.registry import MODELS
from mmengine.model import BaseModule
from torch import Tensor, nn

#: default regression heads: name -> (output channels, number of conv layers)
DEFAULT_COMMON_HEADS: dict[str, tuple[int, int]] = {
    "center": (2, 2),
    "height": (1, 2),
    "dim": (3, 2),
    "rot": (2, 2),
    "vel": (2, 2),
}


class PositionEmbeddingLearned(nn.Module):
    """(x, y) positions ``[B, P, 2]`` -> embeddings ``[B, C, P]`` via Conv1d-BN-ReLU-Conv1d."""

    def __init__(self, input_channel: int, num_pos_feats: int) -> None:
        super().__init__()
        self.position_embedding_head = nn.Sequential(
            nn.Conv1d(input_channel, num_pos_feats, kernel_size=1),
            nn.BatchNorm1d(num_pos_feats),
            nn.ReLU(inplace=True),
            nn.Conv1d(num_pos_feats, num_pos_feats, kernel_size=1),
        )

    def forward(self, xyz: Tensor) -> Tensor:
        return self.position_embedding_head(xyz.transpose(1, 2).contiguous())


class TransFusionDecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention among queries, cross-attention to the BEV
    map, FFN; learned position embeddings added to queries and keys.

    The attribute order is the reference's registration order (attention, FFN, norms,
    then the two position embeddings), so ``state_dict()`` lists keys in the same order.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        if activation not in ("relu", "gelu"):
            raise ValueError(f"unsupported activation {activation!r}; use 'relu' or 'gelu'")
        self.activation = nn.ReLU() if activation == "relu" else nn.GELU()
        self.self_posembed = PositionEmbeddingLearned(2, d_model)
        self.cross_posembed = PositionEmbeddingLearned(2, d_model)

    def forward(self, query: Tensor, key: Tensor, query_pos: Tensor, key_pos: Tensor) -> Tensor:
        """query ``[B, C, P]``, key ``[B, C, HW]``, positions ``[B, P, 2]`` / ``[B, HW, 2]``."""
        q_embed = self.self_posembed(query_pos).transpose(1, 2)  # [B, P, C]
        k_embed = self.cross_posembed(key_pos).transpose(1, 2)  # [B, HW, C]
        q = query.transpose(1, 2)
        k = key.transpose(1, 2) + k_embed

        x = q + q_embed
        q = self.norm1(q + self.dropout1(self.self_attn(x, x, x, need_weights=False)[0]))
        attn = self.multihead_attn(q + q_embed, k, k, need_weights=False)[0]
        q = self.norm2(q + self.dropout2(attn))
        ffn = self.linear2(self.dropout(self.activation(self.linear1(q))))
        q = self.norm3(q + self.dropout3(ffn))
        return q.transpose(1, 2)


class PredictionHeads(nn.Module):
    """One small Conv1d FFN per regressed quantity, each ``[B, C, P] -> [B, out, P]``.

    Each head is ``num_conv - 1`` ConvModules (Conv1d, BN1d, ReLU) and a final Conv1d with
    bias; submodule names are the head names (``center``, ``height``, ...).
    """

    def __init__(
        self,
        in_channels: int,
        heads: Mapping[str, Sequence[int]],
        head_conv: int = 64,
        final_bias: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.head_names = list(heads)
        for name, (out_channels, num_conv) in heads.items():
            layers: list[nn.Module] = []
            channels = in_channels
            for _ in range(int(num_conv) - 1):
                layers.append(
                    ConvModule(
                        channels,
                        head_conv,
                        1,
                        conv_cfg=dict(type="Conv1d"),
                        norm_cfg=dict(type="BN1d"),
                    )
                )
                channels = head_conv
            last = nn.Conv1d(channels, int(out_channels), 1, bias=True)
            if final_bias and name in final_bias:
                nn.init.constant_(last.bias, float(final_bias[name]))
            layers.append(last)
            self.add_module(name, nn.Sequential(*layers))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {name: getattr(self, name)(x) for name in self.head_names}


@MODELS.register_module()
class TransFusionHead(BaseModule):
    """Heatmap-initialised object queries refined by a transformer decoder (inference only).

    Args:
        in_channels: channels of the decoder neck output.
        hidden_channel: query / BEV feature width inside the head.
        num_classes: object classes.
        num_proposals: queries taken from the heatmap's top peaks.
        num_decoder_layers, num_heads, ffn_channel, dropout, activation: decoder layers.
        nms_kernel_size: window of the heatmap local-maximum test.
        point_like_classes: classes whose peaks skip the local-maximum test (small objects
            that sit in adjacent cells; the reference does this for nuScenes' pedestrian
            and traffic cone, classes 8 and 9).
        common_heads: name -> (channels, num_conv) regressed per query; ``heatmap``
            (num_classes, 2) is appended.
        head_conv: hidden width of the prediction FFNs.
        bbox_coder: ``pc_range`` (x_min, y_min), ``voxel_size`` (x, y), ``out_size_factor``,
            optional ``post_center_range`` (6 values) and ``score_threshold`` used by
            :meth:`decode`.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channel: int = 128,
        num_classes: int = 10,
        num_proposals: int = 200,
        num_decoder_layers: int = 1,
        num_heads: int = 8,
        ffn_channel: int = 256,
        dropout: float = 0.1,
        activation: str = "relu",
        nms_kernel_size: int = 3,
        point_like_classes: Sequence[int] = (),
        common_heads: Mapping[str, Sequence[int]] | None = None,
        head_conv: int = 64,
        bbox_coder: Mapping | None = None,
        init_cfg: dict | list | None = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        self.num_classes = num_classes
        self.num_proposals = num_proposals
        self.nms_kernel_size = nms_kernel_size
        self.point_like_classes = [int(c) for c in point_like_classes]
        coder = dict(bbox_coder or {})
        self.pc_range = [float(v) for v in coder.get("pc_range", (-54.0, -54.0))][:2]
        self.voxel_size = [float(v) for v in coder.get("voxel_size", (0.075, 0.075))][:2]
        self.out_size_factor = int(coder.get("out_size_factor", 8))
        post = coder.get("post_center_range")
        self.post_center_range = None if post is None else [float(v) for v in post]
        self.score_threshold = float(coder.get("score_threshold", 0.0))

        self.shared_conv = nn.Conv2d(in_channels, hidden_channel, 3, padding=1, bias=True)
        self.heatmap_head = nn.Sequential(
            ConvModule(
                hidden_channel,
                hidden_channel,
                3,
                padding=1,
                conv_cfg=dict(type="Conv2d"),
                norm_cfg=dict(type="BN2d"),
            ),
            nn.Conv2d(hidden_channel, num_classes, 3, padding=1, bias=True),
        )
        # Sigmoid-focal prior: initial peak scores around 0.1, not 0.5.
        nn.init.constant_(self.heatmap_head[-1].bias, -2.19)
        self.class_encoding = nn.Conv1d(num_classes, hidden_channel, 1)
        self.decoder = nn.ModuleList(
            TransFusionDecoderLayer(hidden_channel, num_heads, ffn_channel, dropout, activation)
            for _ in range(num_decoder_layers)
        )
        heads = {k: tuple(v) for k, v in (common_heads or DEFAULT_COMMON_HEADS).items()}
        heads["heatmap"] = (num_classes, 2)
        self.prediction_heads = nn.ModuleList(
            PredictionHeads(hidden_channel, heads, head_conv, final_bias={"heatmap": -2.19})
            for _ in range(num_decoder_layers)
        )

    @staticmethod
    def bev_positions(nx: int, ny: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Cell-centre positions ``[1, X*Y, 2]`` in the flattening order of ``[X, Y]`` maps."""
        xs = torch.arange(nx, device=device, dtype=dtype) + 0.5
        ys = torch.arange(ny, device=device, dtype=dtype) + 0.5
        gx, gy = torch.meshgrid(xs, ys, indexing="ij")
        return torch.stack((gx, gy), dim=-1).view(1, nx * ny, 2)

    def _local_maxima(self, heatmap: Tensor) -> Tensor:
        """Zero every score that is not the maximum of its window (per class).

        As in the reference, cells within half a window of the map's edge are never
        peaks (their window would be cut), except for ``point_like_classes``, whose
        every cell may be one.
        """
        k = self.nms_kernel_size
        pad = k // 2
        if k <= 1:
            return heatmap
        pooled = F.max_pool2d(heatmap, kernel_size=k, stride=1, padding=pad)
        is_peak = heatmap == pooled
        inner = torch.zeros_like(is_peak[0, 0])
        inner[pad:-pad, pad:-pad] = True
        is_peak = is_peak & inner  # not in place: ONNX has no in-place and (head export)
        for c in self.point_like_classes:
            if c < heatmap.shape[1]:
                is_peak[:, c] = True
        return heatmap * is_peak

    def forward(self, feats: Tensor) -> dict[str, Tensor]:
        """Raw predictions for BEV features ``[B, C_in, X, Y]``.

        Returns a dict of ``[B, k, P]`` tensors (P = proposals): ``center`` (2, in cells,
        already offset by the query position), ``height`` (1, metres, box centre z),
        ``dim`` (3, log size), ``rot`` (2: sin, cos), ``vel`` (2), ``heatmap`` (classes,
        logits), ``query_heatmap_score`` (classes, peak scores), plus ``query_labels``
        ``[B, P]`` and ``dense_heatmap`` ``[B, classes, X, Y]`` (logits).
        """
        batch = feats.shape[0]
        feat = self.shared_conv(feats)
        channels, nx, ny = feat.shape[1:]
        cells = nx * ny
        flat = feat.view(batch, channels, cells)
        bev_pos = self.bev_positions(nx, ny, feat.device, feat.dtype).expand(batch, -1, -1)

        dense_heatmap = self.heatmap_head(feat)
        heatmap = self._local_maxima(dense_heatmap.detach().sigmoid()).view(batch, self.num_classes, cells)
        num = min(self.num_proposals, self.num_classes * cells)
        top = heatmap.view(batch, -1).topk(num, dim=-1).indices
        labels = torch.div(top, cells, rounding_mode="floor")
        index = top % cells

        query = flat.gather(2, index.unsqueeze(1).expand(-1, channels, -1))
        one_hot = F.one_hot(labels, self.num_classes).permute(0, 2, 1).to(query.dtype)
        query = query + self.class_encoding(one_hot)
        query_pos = bev_pos.gather(1, index.unsqueeze(-1).expand(-1, -1, 2))

        preds: dict[str, Tensor] = {}
        for layer, heads in zip(self.decoder, self.prediction_heads):
            query = layer(query, flat, query_pos, bev_pos)
            preds = heads(query)
            preds["center"] = preds["center"] + query_pos.transpose(1, 2)
            query_pos = preds["center"].detach().transpose(1, 2)

        preds["query_heatmap_score"] = heatmap.gather(2, index.unsqueeze(1).expand(-1, self.num_classes, -1))
        preds["query_labels"] = labels
        preds["dense_heatmap"] = dense_heatmap
        return preds

    def decode(self, preds: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
        """Boxes per sample, highest score first.

        Each dict has ``center`` ``[K, 3]`` (x, y metres; z = the box's vertical centre),
        ``size`` ``[K, 3]`` (exp of ``dim``, in the head's channel order: extents along the
        box's x, y, z), ``yaw`` ``[K]`` (atan2(sin, cos)), ``velocity`` ``[K, 2]``, ``score``
        ``[K]`` (regressed class probability times the heatmap peak) and ``label`` ``[K]``.
        K <= num_proposals: boxes below ``score_threshold`` or outside
        ``post_center_range`` are dropped.
        """
        labels = preds["query_labels"]
        scores = preds["heatmap"].sigmoid() * preds["query_heatmap_score"]
        scores = scores.gather(1, labels.unsqueeze(1)).squeeze(1)
        step_x = self.out_size_factor * self.voxel_size[0]
        step_y = self.out_size_factor * self.voxel_size[1]
        x = preds["center"][:, 0] * step_x + self.pc_range[0]
        y = preds["center"][:, 1] * step_y + self.pc_range[1]
        z = preds["height"][:, 0]
        center = torch.stack((x, y, z), dim=-1)  # [B, P, 3]
        size = preds["dim"].exp().transpose(1, 2)
        yaw = torch.atan2(preds["rot"][:, 0], preds["rot"][:, 1])
        velocity = preds["vel"].transpose(1, 2)

        boxes = []
        for b in range(labels.shape[0]):
            keep = scores[b] > self.score_threshold
            if self.post_center_range is not None:
                lo = center.new_tensor(self.post_center_range[:3])
                hi = center.new_tensor(self.post_center_range[3:])
                keep &= ((center[b] >= lo) & (center[b] <= hi)).all(dim=-1)
            order = scores[b][keep].argsort(descending=True)
            idx = keep.nonzero(as_tuple=True)[0][order]
            boxes.append(
                {
                    "center": center[b, idx],
                    "size": size[b, idx],
                    "yaw": yaw[b, idx],
                    "velocity": velocity[b, idx],
                    "score": scores[b, idx],
                    "label": labels[b, idx],
                }
            )
        return boxes
