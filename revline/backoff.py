"""How long to wait before trying again: one jittered exponential backoff for the whole project.

The delays come from tenacity, the library ``stamina`` is built on (the sources' reconnects use
``stamina.retry_context`` directly). Loops that must not block in a retry decorator (the edge's
publisher, which has to notice a stop; the consumer, which waits on its own events) ask for a
delay here and schedule the next attempt themselves.

Full jitter (tenacity's ``wait_random_exponential``): attempt ``n`` waits a random time between
half the initial delay and ``min(maximum, initial * 2 ** (n - 1))``. The spread stays wide at the
ceiling, so a fleet of cars (or a group of consumers) that lost the same server does not come
back in step; the floor keeps the first retry from being immediate.
"""

from __future__ import annotations

import tenacity

__all__ = ["backoff_delay"]


def backoff_delay(attempt: int, *, initial: float, maximum: float) -> float:
    """Seconds to wait before retry ``attempt`` (1-based: the first retry is attempt 1)."""
    floor = min(initial / 2, maximum)
    wait = tenacity.wait_random_exponential(multiplier=initial, max=maximum, min=floor)
    state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
    state.attempt_number = max(attempt, 1)
    return float(wait(state))
