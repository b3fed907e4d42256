"""Pure schedule arithmetic on fixed instants: cron across DST in two zones, intervals,
missed-run policies and jitter bounds. No clock, no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from actors.schedule import (
    Timing,
    fire_at_from_tags,
    fire_tags,
    jitter_offset,
    next_after,
    occurrences,
    plan,
    to_instant,
    unique_key,
    validate,
    zone,
)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def daily_fires(timing: Timing, day_before: datetime, days: int = 3) -> list[datetime]:
    return occurrences(timing, day_before, day_before + timedelta(days=days))


# --------------------------------------------------------------------------- DST: New York


NY = "America/New_York"  # 2025-03-09 02:00 EST -> 03:00 EDT; 2025-11-02 02:00 EDT -> 01:00 EST


def test_new_york_spring_forward_0230_fires_once_at_0300():
    fires = daily_fires(Timing(cron="30 2 * * *", tz=NY), utc(2025, 3, 8, 0))
    assert fires == [
        utc(2025, 3, 8, 7, 30),   # 02:30 EST
        utc(2025, 3, 9, 7, 0),    # 02:30 does not exist: once, at 03:00 EDT
        utc(2025, 3, 10, 6, 30),  # 02:30 EDT
    ]


def test_new_york_fall_back_0130_fires_once_at_first_occurrence():
    fires = daily_fires(Timing(cron="30 1 * * *", tz=NY), utc(2025, 11, 1, 0))
    assert fires == [
        utc(2025, 11, 1, 5, 30),  # 01:30 EDT
        utc(2025, 11, 2, 5, 30),  # 01:30 EDT, the first of the two 01:30s; not 06:30Z
        utc(2025, 11, 3, 6, 30),  # 01:30 EST
    ]


def test_new_york_gap_collapses_many_matches_into_one_fire():
    fires = occurrences(Timing(cron="*/30 * * * *", tz=NY), utc(2025, 3, 9, 6, 0),
                        utc(2025, 3, 9, 8, 0))
    # 01:30 EST, then 02:00 and 02:30 (both missing) and 03:00 EDT -> one fire at 07:00Z.
    assert fires == [utc(2025, 3, 9, 6, 30), utc(2025, 3, 9, 7, 0), utc(2025, 3, 9, 7, 30),
                     utc(2025, 3, 9, 8, 0)]


def test_new_york_wildcard_does_not_repeat_the_fall_back_hour():
    fires = occurrences(Timing(cron="0,30 * * * *", tz=NY), utc(2025, 11, 2, 4, 0),
                        utc(2025, 11, 2, 8, 0))
    assert fires == [
        utc(2025, 11, 2, 4, 30),  # 00:30 EDT
        utc(2025, 11, 2, 5, 0),   # 01:00 EDT
        utc(2025, 11, 2, 5, 30),  # 01:30 EDT; the repeated 01:00/01:30 EST do not fire
        utc(2025, 11, 2, 7, 0),   # 02:00 EST
        utc(2025, 11, 2, 7, 30),
        utc(2025, 11, 2, 8, 0),
    ]


# --------------------------------------------------------------------------- DST: Berlin


BERLIN = "Europe/Berlin"  # 2025-03-30 02:00 CET -> 03:00 CEST; 2025-10-26 03:00 CEST -> 02:00 CET


def test_berlin_spring_forward_0230_fires_once_at_0300():
    fires = daily_fires(Timing(cron="30 2 * * *", tz=BERLIN), utc(2025, 3, 29, 0))
    assert fires == [
        utc(2025, 3, 29, 1, 30),  # 02:30 CET
        utc(2025, 3, 30, 1, 0),   # 03:00 CEST
        utc(2025, 3, 31, 0, 30),  # 02:30 CEST
    ]


def test_berlin_fall_back_0230_fires_once_at_first_occurrence():
    fires = daily_fires(Timing(cron="30 2 * * *", tz=BERLIN), utc(2025, 10, 25, 0))
    assert fires == [
        utc(2025, 10, 25, 0, 30),  # 02:30 CEST
        utc(2025, 10, 26, 0, 30),  # 02:30 CEST (first); 02:30 CET (01:30Z) does not fire
        utc(2025, 10, 27, 1, 30),  # 02:30 CET
    ]


def test_berlin_unaffected_times_keep_local_time_across_transitions():
    fires = daily_fires(Timing(cron="0 6 * * *", tz=BERLIN), utc(2025, 3, 29, 0))
    assert [f.astimezone(zone(BERLIN)).hour for f in fires] == [6, 6, 6]
    assert fires[1] - fires[0] == timedelta(hours=23)  # the short day


@pytest.mark.parametrize("tz", [NY, BERLIN])
def test_next_after_agrees_with_occurrences_across_a_year(tz):
    timing = Timing(cron="30 2 * * *", tz=tz)
    start = utc(2025, 1, 1)
    fires = occurrences(timing, start, start + timedelta(days=365))
    assert len(fires) == 365  # one per day, DST days included
    t = start
    for expected in fires:
        t = next_after(timing, t)
        assert t == expected


def test_next_after_from_the_second_pass_of_a_fold():
    timing = Timing(cron="*/15 * * * *", tz=NY)
    # 01:10 EST, in the repeated hour: the next fire is 02:00 EST.
    assert next_after(timing, utc(2025, 11, 2, 6, 10)) == utc(2025, 11, 2, 7, 0)
    assert occurrences(timing, utc(2025, 11, 2, 5, 50), utc(2025, 11, 2, 6, 10)) == []


def test_to_instant_of_a_normal_time():
    assert to_instant(datetime(2025, 7, 1, 12, 0), zone(NY)) == utc(2025, 7, 1, 16, 0)


# --------------------------------------------------------------------------- intervals


def test_every_is_anchored_at_the_epoch():
    timing = Timing(every_s=10)
    assert occurrences(timing, utc(2025, 1, 1, 0, 0, 3), utc(2025, 1, 1, 0, 0, 31)) == [
        utc(2025, 1, 1, 0, 0, 10), utc(2025, 1, 1, 0, 0, 20), utc(2025, 1, 1, 0, 0, 30)]
    assert next_after(timing, utc(2025, 1, 1, 0, 0, 30)) == utc(2025, 1, 1, 0, 0, 40)
    # Subsecond intervals work on exact microseconds.
    half = Timing(every_s=0.5)
    assert len(occurrences(half, utc(2025, 1, 1), utc(2025, 1, 1, 0, 0, 10))) == 20


def test_occurrences_limit_keeps_the_newest():
    fires = occurrences(Timing(every_s=1), utc(2025, 1, 1), utc(2025, 1, 2), limit=3)
    assert fires == [utc(2025, 1, 1, 23, 59, 58), utc(2025, 1, 1, 23, 59, 59), utc(2025, 1, 2)]


def test_validate():
    validate(Timing(cron="0 6 * * *", tz=BERLIN))
    validate(Timing(cron="@hourly"))
    validate(Timing(every_s=1))
    for bad, message in [
        (Timing(), "exactly one"),
        (Timing(cron="0 6 * * *", every_s=5), "exactly one"),
        (Timing(cron="0 6 * *"), "5 fields"),
        (Timing(cron="* * * * * *"), "5 fields"),
        (Timing(cron="61 6 * * *"), "invalid cron"),
        (Timing(cron="0 6 * * *", tz="Mars/Olympus"), "unknown time zone"),
        (Timing(every_s=0), "at least"),
        (Timing(cron="0 0 30 2 *"), "never fires"),
    ]:
        with pytest.raises(ValueError, match=message):
            validate(bad)


# --------------------------------------------------------------------------- missed policies


MINUTELY = Timing(every_s=60)
NOW = utc(2025, 10, 14, 12, 0, 30)


def test_on_time_occurrences_fire_under_every_policy():
    for policy in ("skip", "latest", "all"):
        p = plan(Timing(every_s=1), NOW - timedelta(seconds=3), NOW, missed=policy)
        assert p.fire == [NOW - timedelta(seconds=2), NOW - timedelta(seconds=1), NOW], policy
        assert p.skipped == 0
        assert p.advance_to == NOW


def test_nothing_due_leaves_the_watermark():
    p = plan(MINUTELY, utc(2025, 10, 14, 12, 0, 0), NOW)
    assert (p.fire, p.skipped, p.advance_to) == ([], 0, None)


def test_skip_drops_missed_occurrences():
    # Down since 09:00; grace 60 s: 11:59:30 onwards is on time (12:00 fires).
    p = plan(MINUTELY, utc(2025, 10, 14, 9, 0), NOW, missed="skip", grace_s=60)
    assert p.fire == [utc(2025, 10, 14, 12, 0)]
    assert p.advance_to == NOW
    # All missed: nothing fires, but the watermark moves past them.
    p = plan(MINUTELY, utc(2025, 10, 14, 9, 0), NOW + timedelta(seconds=60), missed="skip",
             grace_s=10)
    assert p.fire == [] and p.skipped >= 1 and p.advance_to == NOW + timedelta(seconds=60)


def test_latest_fires_the_newest_missed_once():
    daily = Timing(cron="0 6 * * *", tz=BERLIN)
    # Every daemon was down from the 10th to the 14th at noon: one catch-up run, the 14th's.
    p = plan(daily, utc(2025, 10, 10, 0), NOW, missed="latest")
    assert p.fire == [utc(2025, 10, 14, 4, 0)]
    assert p.skipped >= 1
    # When an on-time occurrence fires, the missed backlog does not add a run.
    p = plan(MINUTELY, utc(2025, 10, 14, 9, 0), NOW, missed="latest", grace_s=60)
    assert p.fire == [utc(2025, 10, 14, 12, 0)]


def test_all_fires_the_newest_missed_up_to_the_limit():
    p = plan(MINUTELY, utc(2025, 10, 14, 11, 55), NOW, missed="all", grace_s=10)
    assert p.fire == [utc(2025, 10, 14, 11, m) for m in (56, 57, 58, 59)] + [
        utc(2025, 10, 14, 12, 0)]
    p = plan(MINUTELY, utc(2025, 10, 13, 0), NOW, missed="all", missed_limit=3, grace_s=10)
    assert p.fire == [utc(2025, 10, 14, 11, 58), utc(2025, 10, 14, 11, 59),
                      utc(2025, 10, 14, 12, 0)]
    assert p.skipped >= 1


def test_all_with_a_long_outage_does_not_enumerate_it():
    # A year of one-second occurrences: bounded by the limit, so this is instant.
    p = plan(Timing(every_s=1), NOW - timedelta(days=365), NOW, missed="all", missed_limit=5,
             grace_s=0)
    # NOW itself is on time (grace 0), plus the newest five missed.
    assert p.fire == [NOW - timedelta(seconds=s) for s in (5, 4, 3, 2, 1, 0)]


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="missed must be"):
        plan(MINUTELY, NOW, NOW, missed="sometimes")


# --------------------------------------------------------------------------- jitter, keys


def test_jitter_is_bounded_deterministic_and_spread():
    fires = occurrences(MINUTELY, utc(2025, 1, 1), utc(2025, 1, 2))
    offsets = [jitter_offset("nightly", t, 30.0) for t in fires]
    assert all(0.0 <= o < 30.0 for o in offsets)
    assert offsets == [jitter_offset("nightly", t, 30.0) for t in fires]  # every daemon agrees
    assert min(offsets) < 3.0 and max(offsets) > 27.0  # spread over the whole window
    assert sum(offsets) / len(offsets) == pytest.approx(15.0, abs=1.5)
    assert jitter_offset("other", fires[0], 30.0) != offsets[0]
    assert jitter_offset("nightly", fires[0], 0.0) == 0.0


def test_keys_and_tags_carry_the_occurrence():
    t = utc(2025, 10, 14, 4, 0)
    assert unique_key("daily", t) == "schedule:daily:2025-10-14T04:00:00+00:00"
    assert fire_tags("daily", t) == ["schedule:daily", "fire:2025-10-14T04:00:00+00:00"]
    assert fire_at_from_tags(["x", *fire_tags("daily", t)]) == t
    assert fire_at_from_tags(["x"]) is None
