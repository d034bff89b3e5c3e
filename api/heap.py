"""The cyclic garbage collector in a serving API process.

Measured with the open-loop bench (bench/loadgen.py, 3,000 requests/s arriving) and gc.callbacks in
the API process, with CPython 3.11's default thresholds (700, 10, 10):

- Start-up leaves about 120,000 container objects that live as long as the process (modules,
  classes, FastAPI's routes and dependency graphs, pydantic's validators). Every collection of the
  oldest generation walked all of them: about 100 ms of CPU each on the 2-core bench machine (over
  300 ms of wall time when it was busy), during which no request is answered; under load one came
  every ~700 requests. GC took a third of the API's CPU.
- An execute request makes ~100 tracked objects and no reference cycles (reference counting frees
  them all), but the young collection ran whenever 700 more had been made than freed: every few
  requests, walking and promoting whatever the requests in flight held at that moment, which is
  what kept filling the oldest generation.

So, once the API has started: the objects start-up made are frozen (gc.freeze: never walked again,
and never freed, which they would not be anyway), and the young collection waits for 20,000
surviving objects, which a burst of in-flight requests does not reach; cycles, which are rare, still
get collected, later. Only `nova api` does this (create_app(settle_heap=True)): a test process
creates many applications and must not freeze one's objects for the rest of its run.
"""

from __future__ import annotations

import gc

# Objects made and not yet freed since the last young collection before the next one runs.
YOUNG_THRESHOLD = 20_000


def settle_heap() -> None:
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
