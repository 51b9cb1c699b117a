"""Reach a deqguard model without torch: an HTTP client, and batch scoring of image folders.

    from deqguard.clients import Client
    Client("http://127.0.0.1:3000").classify("image.png").class_name

Importing this package never imports torch (the base install has none); the local and Ray
scoring engines import it only when they run.
"""

from deqguard.serving.schema import ClassifyResult, Detection, ModelRef

from .client import AsyncClient, Client, ClientError, ConnectionFailed, ServerError

__all__ = ["AsyncClient", "ClassifyResult", "Client", "ClientError", "ConnectionFailed",
           "Detection", "ModelRef", "ServerError"]
