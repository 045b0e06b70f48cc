"""The network server: the Open Inference Protocol (KServe v2) over HTTP in
front of compiled models, each behind a deadline-aware batcher
(rtjax.infer.batcher), with Prometheus metrics. Needs `rtjax[serve]`."""

from rtjax.serve.app import ModelServer
from rtjax.serve.server import serve
from rtjax.serve.servable import Servable, from_checkpoint

__all__ = ["ModelServer", "Servable", "from_checkpoint", "serve"]
