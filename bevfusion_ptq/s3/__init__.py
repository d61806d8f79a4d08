"""Publishing versions to S3 (or a local directory with the same layout) and fetching them.

Layout under an output URL: ``<prefix>/<model>/<version>/`` (the files and ``manifest.json``,
written last) and ``<prefix>/<model>/latest.json``. Plain boto3 and the standard AWS
configuration; no Prefect here (``tasks/publish.py`` wraps :func:`publish_version`).
"""

from bevfusion_ptq.s3.client import make_client, transfer_config
from bevfusion_ptq.s3.fetch import download_checkpoint, fetch_version, input_summary, list_versions
from bevfusion_ptq.s3.publish import PublishResult, publish_version
from bevfusion_ptq.s3.url import Location, parse_url

__all__ = [
    "Location", "PublishResult", "download_checkpoint", "fetch_version", "input_summary", "list_versions",
    "make_client", "parse_url", "publish_version", "transfer_config",
]
