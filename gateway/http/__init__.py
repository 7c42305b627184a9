"""The gateway's HTTP/JSON face (``--http-port``): twostage's own routes, and TEI's, Cohere's and OpenAI's
rerank and embedding routes, in the gateway process, over the same pipeline as gRPC."""

from gateway.http.face import HttpFace

__all__ = ["HttpFace"]
