"""The deployment files CUDA-BEVFusion's runtime consumes (``reference/export.md``).

One module per file family: :mod:`.camera` (camera.backbone / camera.vtransform), :mod:`.fuser`
(fuser + decoder), :mod:`.head` (head.bbox, plain and plugin LayerNorm), :mod:`.lidar` (the
"scn" graph for libspconv), :mod:`.deploy_doc` (deploy.md); :mod:`.deployment` writes the set.
"""

from bevfusion_ptq.export.deployment import DEPLOY_DOC, FILES, GraphInfo, export_deployment, sample_inputs, set_dir

__all__ = ["DEPLOY_DOC", "FILES", "GraphInfo", "export_deployment", "sample_inputs", "set_dir"]
