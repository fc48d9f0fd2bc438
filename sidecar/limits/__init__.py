"""Rate limits and holds.

* :mod:`~sidecar.limits.gcra` -- the contract (:class:`RateLimiter`, :class:`Rate`) and the
  GCRA decision itself, pure;
* :mod:`~sidecar.limits.memory` -- :class:`MemoryRateLimiter`, one process;
* :mod:`~sidecar.limits.redis` -- ``RedisRateLimiter``, a fleet on one Redis (imported on
  demand: it loads the Redis client);
* :mod:`~sidecar.limits.holds` -- :class:`Holds`: "the provider told us to wait" (a 429's
  Retry-After, ``x-ratelimit-*`` used up) as blocks in whichever limiter is configured.
"""

from sidecar.limits.gcra import LimiterUnavailable, Rate, RateLimiter, gcra
from sidecar.limits.holds import Hold, Holds
from sidecar.limits.memory import MemoryRateLimiter

__all__ = ["Hold", "Holds", "LimiterUnavailable", "MemoryRateLimiter", "Rate", "RateLimiter",
           "gcra"]
