"""bevfusion-ptq: post-training INT8 quantization of BEVFusion.

The library never imports Prefect; ``tasks/`` and ``flows/`` wrap it.
"""

__version__ = "0.2.0"
