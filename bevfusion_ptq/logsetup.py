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
           "s3transfer": logging.WARNING, "boto3": logging.WARNING}


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
    if quiet:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    return level


def _silence_absl_handler() -> None:
    """absl prints its "before flag parsing" line when it logs before flags are parsed, and
    puts its own handler on the root logger when imported (pytorch-quantization imports it).
    Marking the flags parsed and keeping its handler off the root leaves our one handler."""
    try:
        from absl import flags
        from absl import logging as absl_logging
    except ImportError:  # pragma: no cover - absl comes with pytorch-quantization
        return
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    handler = absl_logging.get_absl_handler()
    if handler in logging.root.handlers:
        logging.root.removeHandler(handler)
