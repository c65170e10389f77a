"""Typed errors raised by the torch-free client.

Every failure a user can cause (bad image, unreachable server, incompatible bank, malformed
support set) gets its own exception type so that applications can react to it, and every
message names the offending thing (URL, path, image index, label value). Input-like errors
subclass `ValueError` and environment-like errors `RuntimeError`, so the `neco` CLI and generic
handlers treat them sensibly.
"""

from __future__ import annotations

from neco.errors import EXIT_USAGE, NecoError


class ClientError(NecoError):
    """Base class of every error raised by `neco.client`; the CLI exits 2 for all of them."""

    exit_code = EXIT_USAGE
    retryable: bool = False
    """True when the same request may succeed later or on another server (`RetryPolicy` retries it)."""


class ImageError(ClientError, ValueError):
    """An input is not a decodable 8-bit image (zero-size, 16-bit, truncated, not an image...)."""


class ServerUnavailableError(ClientError, RuntimeError):
    """The Triton server at the given URL cannot be reached, dropped the connection, or is not live.

    Retryable unless the server answered in a way a retry cannot change (another protocol).
    """

    def __init__(self, url: str, detail: str = "", retryable: bool = True) -> None:
        self.url = url
        self.detail = detail
        self.retryable = retryable
        suffix = f": {detail}" if detail else ""
        super().__init__(f"Triton server at {url!r} is not reachable{suffix}")


class EndpointError(ClientError, ValueError):
    """A server URL is malformed (a scheme such as 'http://', no port, an empty list)."""


class ModelNotFoundError(ClientError, RuntimeError):
    """The server is up but does not know the requested model."""


class ModelNotReadyError(ClientError, RuntimeError):
    """The server knows the model but it is not (yet) ready to serve requests."""

    retryable = True


class InferenceError(ClientError, RuntimeError):
    """The server rejected or failed an inference request."""


class ServerOverloadedError(InferenceError):
    """The server refused a request because it is busy (queue full, resource exhausted); retryable."""

    retryable = True


class ContractError(ClientError, ValueError):
    """A model contract is missing, not understood, or does not match another one."""


class BankError(ClientError, ValueError):
    """A memory bank cannot be built, saved, loaded or searched."""


class BankVersionError(BankError):
    """A saved bank was written by a newer format version than this client reads."""


class BankCorruptError(BankError):
    """A saved bank's files are missing, malformed or fail their checksum."""


class BankBusyError(BankError, RuntimeError):
    """Another process is writing the same bank (its writer lock was not free in time); retryable."""

    retryable = True


class BankContractError(BankError, ContractError):
    """A bank was built with a different model/contract than the one it is used with."""


class BankStoreError(BankError):
    """A vector store (a Milvus collection) refused an operation, or lacks a feature asked of it
    (e.g. FLOAT16 vectors on Milvus Lite), or holds a collection this project did not write."""


class BankStoreUnavailableError(BankStoreError, RuntimeError):
    """The vector store at the given URI cannot be reached (no server, wrong port, timeout)."""

    retryable = True


class SupportSetError(ClientError, ValueError):
    """A support set is empty or holds a mask that does not fit its image or class list."""


class NoveltyError(BankError):
    """Novelty scores cannot be fitted, calibrated or computed (bank too small, d > width, ...)."""


class NoveltyNotFittedError(NoveltyError):
    """NECO was asked of a bank without a fitted subspace (e.g. one saved in format version 1)."""


class NoveltyNotCalibratedError(NoveltyError):
    """A novelty decision needs a calibration the bank does not hold (or holds for other settings)."""
