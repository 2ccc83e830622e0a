"""The project's one backoff: jittered, exponential, bounded."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from revline.backoff import backoff_delay


@given(
    attempt=st.integers(-3, 10_000),
    initial=st.floats(0.01, 100),
    maximum=st.floats(0.01, 3600),
)
def test_a_delay_stays_between_half_the_first_and_the_ceiling(
    attempt: int, initial: float, maximum: float
) -> None:
    """Never sooner than half the initial delay, never later than the window nor the maximum."""
    delay = backoff_delay(attempt, initial=initial, maximum=maximum)
    window = initial * 2.0 ** (min(max(attempt, 1), 60) - 1)
    assert min(initial / 2, maximum) <= delay <= min(window, maximum) * (1 + 1e-9)


def test_delays_grow_to_the_ceiling_and_stay_spread_there() -> None:
    """Later attempts wait longer, up to the maximum, and cars that failed together do not
    retry together: at the ceiling the delays still spread over most of the range."""
    first = [backoff_delay(1, initial=1.0, maximum=60.0) for _ in range(200)]
    capped = [backoff_delay(50, initial=1.0, maximum=60.0) for _ in range(200)]
    assert max(first) <= 1.0
    assert max(capped) > 50.0
    assert min(capped) < 20.0
    assert sum(capped) / len(capped) > 10 * sum(first) / len(first)
