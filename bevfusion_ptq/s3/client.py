"""The S3 client, its transfer settings, and what its exceptions mean to a user.

Credentials, region and endpoint come from the standard AWS chain (environment, profiles,
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``), all resolved by botocore itself; we only add
an explicit endpoint for S3-compatible stores. Transient failures (5xx, throttling, dropped
connections) are retried by botocore's ``standard``/``adaptive`` retry modes, never by a loop
of ours; what is left after those retries becomes :class:`TransientStorageError`, which the
Prefect task may retry later.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3
import botocore.session
from boto3.s3.transfer import TransferConfig
from botocore import exceptions as bex
from botocore.config import Config

from bevfusion_ptq.errors import PTQError, PublishError, TransientStorageError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
# Multipart above 64 MiB in 16 MiB parts: the reference checkpoints (~200 MB) go in ~13
# parallel parts; the JSON files and small models in one PUT with a SHA256 checksum.
DEFAULT_TRANSFER = dict(multipart_threshold=64 * MiB, multipart_chunksize=16 * MiB, max_concurrency=8)

_THROTTLING = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
               "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequestsException"}
_AUTH = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
         "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem"}
_NETWORK = (bex.EndpointConnectionError, bex.ConnectionError, bex.HTTPClientError,
            bex.ConnectionClosedError, bex.ReadTimeoutError, bex.ConnectTimeoutError)


def transfer_config(**overrides: Any) -> TransferConfig:
    """Our defaults for boto3's managed transfer; any TransferConfig argument overrides them."""
    return TransferConfig(**{**DEFAULT_TRANSFER, **overrides})


def _quiet_sdk_loggers() -> None:
    """Keep botocore/urllib3 DEBUG output (signed headers, access key ids) out of ``-v`` logs,
    and their INFO chatter ("Found credentials in environment variables") out of normal ones.

    Only loggers the user has not configured are capped, so an explicit botocore DEBUG setup
    still works for whoever deliberately asks for it.
    """
    for name in ("botocore", "boto3", "s3transfer", "urllib3"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


_LOADER: Any = None


def _shared_loader(core: Any) -> Any:
    """botocore's JSON model loader, shared: each fresh session would re-parse the S3 model
    (~0.3 s); sessions themselves stay per call so credentials and env are read anew."""
    global _LOADER
    if _LOADER is None:
        _LOADER = core.get_component("data_loader")
    return _LOADER


def make_client(
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    profile: str | None = None,
    retry_mode: str | None = None,
    max_attempts: int | None = None,
    max_pool_connections: int = 16,
) -> Any:
    """An S3 client from the standard AWS configuration, with our retry and pool settings.

    ``retry_mode`` defaults to the configured one (``AWS_RETRY_MODE`` or the profile), except
    that botocore's old ``legacy`` default becomes ``standard``, which backs off on throttling.
    ``max_attempts`` left ``None`` keeps ``AWS_MAX_ATTEMPTS`` or the mode's own default.
    """
    _quiet_sdk_loggers()
    core = botocore.session.Session(profile=profile)
    core.register_component("data_loader", _shared_loader(core))
    mode = retry_mode or core.get_config_variable("retry_mode") or "standard"
    if mode == "legacy":
        mode = "standard"
    if mode not in ("standard", "adaptive"):
        raise PublishError(f"unsupported retry mode {mode!r}: use standard or adaptive")
    retries: dict[str, Any] = {"mode": mode}
    if max_attempts is not None:
        retries["total_max_attempts"] = max_attempts
    config = Config(retries=retries, max_pool_connections=max_pool_connections)
    session = boto3.session.Session(botocore_session=core, region_name=region)
    return session.client("s3", endpoint_url=endpoint_url, config=config)


def redact(text: str) -> str:
    """Drop user-info and query strings from URLs in a message (no credentials, no signatures)."""
    text = re.sub(r"(\w+://)[^/\s@\"']+@", r"\1", text)
    return re.sub(r"(\w+://[^\s\"'?]+)\?[^\s\"']*", r"\1", text)


def _client_error_code(exc: BaseException) -> tuple[str, int] | None:
    """(code, HTTP status) of the ClientError behind ``exc``, following boto3's wrappers."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, bex.ClientError):
            meta = exc.response.get("ResponseMetadata", {})
            return exc.response.get("Error", {}).get("Code", ""), int(meta.get("HTTPStatusCode") or 0)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def _network_error(exc: BaseException) -> BaseException | None:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, _NETWORK):
            return exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def classify(exc: BaseException, what: str, error: type[PTQError] = PublishError) -> PTQError:
    """Map a boto exception to one of ours with a one-line message naming ``what`` failed."""
    if isinstance(exc, PTQError):
        return exc
    if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return error(f"{what}: no AWS credentials found (set AWS_PROFILE, or AWS_ACCESS_KEY_ID and "
                     "AWS_SECRET_ACCESS_KEY, or use an instance role)")
    if isinstance(exc, bex.ProfileNotFound):
        return error(f"{what}: {exc}")
    if (net := _network_error(exc)) is not None:
        return TransientStorageError(f"{what}: S3 endpoint unreachable after botocore's retries "
                                     f"({type(net).__name__}: {redact(str(net))})")
    coded = _client_error_code(exc)
    if coded is not None:
        code, status = coded
        if code in _AUTH or status == 403:
            return error(f"{what}: access denied ({code or status}); check the AWS credentials or profile")
        if code == "NoSuchBucket":
            return error(f"{what}: the bucket does not exist")
        if status >= 500 or status == 429 or code in _THROTTLING:
            return TransientStorageError(f"{what}: S3 kept failing after botocore's retries ({code or status})")
        return error(f"{what}: {code or status}: {redact(str(exc))}")
    if isinstance(exc, (bex.BotoCoreError,)) or type(exc).__module__.startswith(("boto3", "s3transfer")):
        return error(f"{what}: {type(exc).__name__}: {redact(str(exc))}")
    raise exc


@contextmanager
def translated(what: str, error: type[PTQError] = PublishError) -> Iterator[None]:
    """Re-raise boto failures inside the block as our errors; others pass through unchanged."""
    try:
        yield
    except PTQError:
        raise
    except Exception as exc:  # noqa: BLE001 - classify() re-raises what it does not know
        raise classify(exc, what, error) from exc
