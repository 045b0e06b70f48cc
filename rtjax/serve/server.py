"""Runs a ModelServer under uvicorn until SIGTERM or SIGINT: then it stops
accepting connections, answers every request already in (uvicorn waits for
them, the batchers drain their queues) and returns, so the process exits 0.

uvicorn re-raises the signal it caught once it has shut down; the handlers
installed here take that second delivery, so it does not kill the process
with the signal's default action.
"""

from __future__ import annotations

import signal

import uvicorn

from rtjax.errors import FlagError
from rtjax.serve.app import ModelServer
from rtjax.timing import realtime_threads


def uvicorn_server(server: ModelServer, host: str, port: int,
                   log_level: str = "warning") -> uvicorn.Server:
  """uvicorn (uvloop and httptools when installed), no access log (a line per
  request costs more than a small model's call), no limit on the graceful
  shutdown: requests in flight are answered, not cut."""
  config = uvicorn.Config(server.app, host=host, port=port,
                          log_level=log_level, access_log=False,
                          lifespan="on", timeout_graceful_shutdown=None)
  runner = uvicorn.Server(config)
  server.on_load_error = lambda: setattr(runner, "should_exit", True)
  return runner


def serve(server: ModelServer, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "warning") -> None:
  """Blocks until a signal stops the server; raises a model's load error.
  The event loop and the batchers' workers run with a real-time process's
  thread settings (rtjax.timing.realtime_threads)."""
  runner = uvicorn_server(server, host, port, log_level)
  handled = (signal.SIGTERM, signal.SIGINT)
  previous = {s: signal.signal(s, lambda *_: None) for s in handled}
  try:
    with realtime_threads():
      runner.run()
  except SystemExit:  # uvicorn exits when it cannot bind
    if runner.started:
      raise
    raise FlagError(f"cannot listen on {host}:{port}: the port is in use or "
                    "the host is no address of this machine") from None
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  if server.load_error is not None:
    raise server.load_error
