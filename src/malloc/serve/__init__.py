"""``malloc serve``: a data set's events replayed over time as requests against a persistent state store, under one
global byte budget.

- :mod:`.options`: the command's options, checked before any work (:class:`ServeError`);
- :mod:`.requests`: which events are requests, in timestamp order across users, and each user's event log;
- :mod:`.server`: one request: get, decode or recompute, score, append, encode, make room, put;
- :mod:`.allocator`: the budget's bookkeeping: uniform, LRU of whole users, adaptive per-user ratios;
- :mod:`.budget`: Native's bytes on the same replay, and the uniform ratio that meets a budget;
- :mod:`.meters`: per-request stage times, bytes moved and outcomes;
- :mod:`.journal`: checkpoints and the undo log that make a killed replay resume exactly;
- :mod:`.worker`: one worker's loop, and workers in processes sharing a store;
- :mod:`.result`: accuracy (and anchors), latency, bytes and counts; the printed table;
- :mod:`.run`: :func:`serve`, the whole command.

docs/SERVING.md describes the protocol and holds the measured numbers.
"""

from malloc.serve.options import ALLOCATORS, ServeError, ServeOptions, parse_fraction
from malloc.serve.run import serve

__all__ = ["ALLOCATORS", "ServeError", "ServeOptions", "parse_fraction", "serve"]
