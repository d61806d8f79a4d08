"""One logging configuration for the command line, and for scripts that want the same.

One handler on the root logger, one format, one level for our loggers; third-party chatter
capped: absl (through pytorch-quantization) would otherwise print glog-style lines ("WARNING:
Logging before flag parsing goes to stderr.") through a handler of its own.
"""

from __future__ import annotations

import logging
import os

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Loggers that speak at INFO about things a user of this tool never needs.
_CAPPED = {"absl": logging.ERROR, "numba": logging.WARNING, "matplotlib": logging.WARNING,
           "PIL": logging.WARNING, "botocore": logging.WARNING, "urllib3": logging.WARNING,
           "s3transfer": logging.WARNING, "boto3": logging.WARNING,
           # one line per request to the Prefect API
           "httpx": logging.WARNING, "httpcore": logging.WARNING}


def configure_logging(*, verbose: bool = False, quiet: bool = False) -> int:
    """Set the root handler and our level (DEBUG with ``verbose``, WARNING with ``quiet``).

    Prefect configures its own loggers when it is imported; ``PREFECT_LOGGING_LEVEL`` is set
    here (unless the user set it) so its console lines follow ``--quiet`` too.
    """
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    _silence_absl_handler()
    # A no-op where the root logger already has a handler (pytest, an application embedding us).
    logging.basicConfig(level=level, format=FORMAT)
    logging.getLogger("bevfusion_ptq").setLevel(level)
    for name, cap in _CAPPED.items():
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or name == "absl":
            logger.setLevel(cap)
    # torch's own handler writes glog-style lines ("W1202 05:40:19.95 ...]"); same format here.
    os.environ.setdefault("TORCH_LOGS_FORMAT", FORMAT)
    if quiet:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    return level


def _silence_absl_handler() -> None:
    """Keep absl's handler off the root logger, now and when pytorch-quantization is imported.

    pytorch-quantization calls ``absl.logging.use_absl_handler()`` on import, which removes
    every stderr handler from the root logger, adds absl's own (glog-style lines, and
    "WARNING: Logging before flag parsing goes to stderr." first) and resets the root level.
    absl has no setting against that, so once an application has chosen its logging (this
    function), that call becomes a no-op; absl's own records still reach the "absl" logger.
    """
    try:
        from absl import flags
        from absl import logging as absl_logging
    except ImportError:  # pragma: no cover - absl comes with pytorch-quantization
        return
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # no "before flag parsing" line from any absl handler
    absl_logging.use_absl_handler = _absl_handler_declined
    handler = absl_logging.get_absl_handler()
    if handler in logging.root.handlers:
        logging.root.removeHandler(handler)


def _absl_handler_declined() -> None:
    """Stands in for ``absl.logging.use_absl_handler`` once logging is configured."""
