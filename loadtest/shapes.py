"""Load shapes: how many terminals are connected at each moment of a run.

One locust shape class, ``CityShape``, follows the profile named by the
locustfile's ``--shape`` option. Every profile reads locust's own ``-u``
(users at the peak), ``-r`` (the least spawn rate) and ``-t`` (length):

- ``soak``: ``-u`` users all along, for ``-t`` (or until stopped), like
  locust without a shape;
- ``day``: one compressed city day in ``-t`` (default 240 s, ten seconds an
  hour): a night lull, the morning rush at 08:00, a midday plateau and the
  evening rush at 18:00, as fractions of ``-u`` (``DAY_PROFILE``);
- ``spike``: a tenth of ``-u`` as the base; at a third of ``-t`` (default
  60 s) all ``-u`` users arrive within about a second, stay for a sixth of
  the run, then leave as fast; the base runs on to the end.

Users are terminals pacing themselves (``--rate``), so load in taps a second
is proportional to users: the spike is ten times the base load.

Example::

    locust -f loadtest/locustfile.py --headless --shape spike -u 100 -t 60s
"""

from __future__ import annotations

from locust import LoadTestShape

SHAPES = ("soak", "day", "spike")

DAY_SECONDS_DEFAULT = 240.0
SPIKE_SECONDS_DEFAULT = 60.0

# Share of the peak of users by hour of the day (0..23), shaped like a city
# bus's hourly boardings: almost nothing at night, a sharp morning rush, a
# midday plateau with a lunch bump, a broader evening rush, then a decline.
DAY_PROFILE: tuple[float, ...] = (
    0.03, 0.02, 0.01, 0.01, 0.02, 0.08,  # 00-05 night lull
    0.35, 0.85, 1.00, 0.70, 0.50, 0.50,  # 06-11 morning rush, then midday
    0.55, 0.65, 0.60, 0.55, 0.65, 0.85,  # 12-17 lunch, afternoon, evening rush begins
    0.90, 0.70, 0.45, 0.30, 0.15, 0.07,  # 18-23 evening rush, then night
)  # fmt: skip

# The spike lasts a sixth of the run and multiplies the base by ten.
SPIKE_FACTOR = 10
SPIKE_START_SHARE = 1 / 3
SPIKE_LENGTH_SHARE = 1 / 6


def day_users(peak_users: int, elapsed_s: float, day_s: float) -> int:
    """Users at ``elapsed_s`` into a day compressed into ``day_s`` seconds
    (linear between hourly points; at least one user).

    >>> day_users(100, 80.0, 240.0)  # 08:00, the morning peak
    100
    >>> day_users(100, 30.0, 240.0)  # 03:00
    1
    """
    hour = (elapsed_s / day_s * 24.0) % 24.0
    index = int(hour)
    low, high = DAY_PROFILE[index], DAY_PROFILE[(index + 1) % 24]
    share = low + (high - low) * (hour - index)
    return max(1, round(peak_users * share))


def spike_users(peak_users: int, elapsed_s: float, run_s: float) -> int:
    """Users at ``elapsed_s`` into a spike run of ``run_s`` seconds.

    >>> [spike_users(100, t, 60.0) for t in (0.0, 25.0, 40.0)]
    [10, 100, 10]
    """
    base = max(1, peak_users // SPIKE_FACTOR)
    start = run_s * SPIKE_START_SHARE
    if start <= elapsed_s < start + run_s * SPIKE_LENGTH_SHARE:
        return max(base, peak_users)
    return base


class CityShape(LoadTestShape):
    """The profile named by ``--shape`` (soak, day, spike); see the module doc."""

    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        assert self.runner is not None  # locust sets it before the first tick
        options = self.runner.environment.parsed_options
        shape = getattr(options, "shape", "soak")
        users = int(getattr(options, "num_users", None) or 1)
        spawn_rate = float(getattr(options, "spawn_rate", None) or 1.0)
        run_time = getattr(options, "run_time", None)
        elapsed = self.get_run_time()
        if shape == "day":
            length = float(run_time or DAY_SECONDS_DEFAULT)
            if elapsed >= length:
                return None
            # Follow the curve: at least the whole peak over one compressed hour.
            return day_users(users, elapsed, length), max(spawn_rate, users * 24.0 / length)
        if shape == "spike":
            length = float(run_time or SPIKE_SECONDS_DEFAULT)
            if elapsed >= length:
                return None
            # "Within seconds": every user of the spike starts within one second.
            return spike_users(users, elapsed, length), max(spawn_rate, float(users))
        if run_time and elapsed >= run_time:
            return None
        return users, spawn_rate
