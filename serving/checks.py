"""What `deqguard serve` checks before it hands the process over to BentoML.

Why: once BentoML runs, a wrong checkpoint or a busy port ends in a long traceback from its
arbiter, worded in the server's own settings (`DEQGUARD_CHECKPOINT`, `--arg checkpoint=`), not in
the arguments the user typed. Checked here first, each problem is one line that names the
argument as given. The checkpoint gets the same full load the service's preflight does (tensor
hash and the metadata blocks the engine reads), so what passes here also starts there.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from pathlib import Path

from deqguard.errors import DeqguardError
from deqguard.store import bentoml_available, find_stored, is_tag, store_location

WHAT_TO_GIVE = "give a path, a shipped name such as 'default', or a model-store tag name:version"


class ServeError(DeqguardError):
    """An argument of `deqguard serve` that the server could not start with."""


def _one_line(exc: BaseException) -> str:
    """Error text on one line: pydantic and loader messages can span several."""
    return " ".join(str(exc).split())


def check_checkpoint(text: str, label: str) -> None:
    """Raise ServeError unless `text` names a checkpoint the server can load.

    `label` is how the user gave it (e.g. "checkpoint 'foo.safetensors'"), used in every message.
    """
    from deqguard.models.checkpoint import NAMED_CHECKPOINTS
    from deqguard.models.errors import CheckpointError

    if text not in NAMED_CHECKPOINTS and not Path(text).exists():
        if not is_tag(text):
            raise ServeError(f"{label} not found ({WHAT_TO_GIVE})")
        if not bentoml_available():
            raise ServeError(f"{label} is not a file, and bentoml (which keeps the model store) "
                             "is not installed")
        if find_stored(text) is None:
            raise ServeError(f"{label} is not a file and not a model in the BentoML model store "
                             f"({store_location()}; `deqguard models list` shows what it holds)")
    from deqguard.models import load_checkpoint
    from deqguard.models.learned_detector import detector_from_metadata
    from deqguard.models.selective import selective_from_metadata

    try:
        _, meta = load_checkpoint(text, device="cpu")
        detector_from_metadata(meta)
        selective_from_metadata(meta)
    except CheckpointError as exc:
        raise ServeError(f"{label} cannot be served: {_one_line(exc)}") from None


def check_onnx(path: str, label: str) -> None:
    """Raise ServeError unless the exported graph `path` is a file."""
    if not Path(path).is_file():
        what = "is not a file" if Path(path).exists() else "not found"
        raise ServeError(f"{label} {what} (write one with `deqguard export-onnx`, or leave "
                         "--onnx out to export at start-up)")


def check_port(host: str, port: int) -> None:
    """Raise ServeError unless this machine can listen on host:port now, as BentoML would.

    BentoML binds an IP address (not a host name) with SO_REUSEADDR, so the same is tried here:
    a port held by a listening server fails, one in TIME_WAIT does not.
    """
    if not 1 <= port <= 65535:
        raise ServeError(f"port {port} is not a TCP port (1-65535); pick another with --port")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ServeError(f"host {host!r} is not an IP address; give one with --host, e.g. "
                         "127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(1)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServeError(f"port {port} on {host} is in use; pick another with "
                                 "--port") from None
            if exc.errno == errno.EACCES:
                raise ServeError(f"port {port} on {host} needs privileges this user lacks "
                                 "(ports below 1024); pick another with --port") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ServeError(f"host {host} is not an address of this machine; give one "
                                 "with --host, e.g. 127.0.0.1 or 0.0.0.0") from None
            raise ServeError(f"cannot listen on {host} port {port}: {exc.strerror}") from None
