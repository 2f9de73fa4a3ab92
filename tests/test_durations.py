"""The one duration grammar: settings, Consul's ?wait= and a registration's
DeregisterCriticalServiceAfter all read and write durations through meshgw.durations."""

from __future__ import annotations

import pytest

from meshgw.durations import go_duration, parse_duration


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(300, "5m"), (600, "10m"), (6 * 3600, "6h"), (90, "90s"), (0.5, "500ms"), (1.25, "1250ms")],
)
def test_go_duration_round_trips(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text
    assert parse_duration(text) == seconds


def test_parse_duration_forms() -> None:
    assert parse_duration("1m30s") == 90
    assert parse_duration(" 200ms ") == 0.2
    assert parse_duration(2) == 2.0
    assert parse_duration("5") == 5.0  # a bare number is seconds


@pytest.mark.parametrize("bad", ["soon", "-1s", "", "5x", "1m 30s", float("inf"), True])
def test_parse_duration_refuses(bad: str | float) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)
