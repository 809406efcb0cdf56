"""A small five-field cron matcher (``croniter`` is not a dependency of the fabric).

Fields: minute (0-59), hour (0-23), day of month (1-31), month (1-12), day of week (0-6,
Sunday = 0; 7 also means Sunday). Each field is ``*``, a number, a range ``a-b``, a list
``a,b``, or any of those with a step ``/n``. As in Vixie cron, when both day fields are
restricted a day matches if either does. Times are UTC.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

_BOUNDS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_NAMES = ("minute", "hour", "day of month", "month", "day of week")


@dataclass(frozen=True)
class CronSpec:
    """A parsed cron expression."""

    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    days_any: bool
    weekdays_any: bool

    @classmethod
    def parse(cls, text: str) -> CronSpec:
        """Parse ``text``; raise ``ValueError`` naming the bad field."""
        fields = str(text).split()
        if len(fields) != 5:
            raise ValueError(f"cron expression {text!r} needs 5 fields (minute hour day month "
                             f"weekday), got {len(fields)}")
        sets = [_field(f, lo, hi, name) for f, (lo, hi), name in zip(fields, _BOUNDS, _NAMES,
                                                                      strict=True)]
        weekdays = frozenset(0 if d == 7 else d for d in sets[4])
        return cls(sets[0], sets[1], sets[2], sets[3], weekdays,
                   days_any=fields[2] == "*", weekdays_any=fields[4] == "*")

    def matches(self, when: dt.datetime) -> bool:
        """True if the minute ``when`` (UTC) is a firing time."""
        if when.minute not in self.minutes or when.hour not in self.hours:
            return False
        if when.month not in self.months:
            return False
        return self._day_ok(when)

    def _day_ok(self, when: dt.datetime) -> bool:
        dom = when.day in self.days
        dow = (when.isoweekday() % 7) in self.weekdays
        if self.days_any or self.weekdays_any:
            return dom and dow
        return dom or dow

    def next_after(self, epoch: float) -> float:
        """Epoch seconds of the first firing minute strictly after ``epoch``."""
        when = dt.datetime.fromtimestamp(epoch, dt.UTC).replace(second=0, microsecond=0)
        when += dt.timedelta(minutes=1)
        # Skip whole days that cannot match: at most ~4 years of days, then minutes in a day.
        for _ in range(366 * 5):
            if when.month in self.months and self._day_ok(when):
                for _ in range(24 * 60):
                    if self.matches(when):
                        return when.timestamp()
                    when += dt.timedelta(minutes=1)
                    if when.hour == 0 and when.minute == 0:
                        break
            else:
                when = (when + dt.timedelta(days=1)).replace(hour=0, minute=0)
        raise ValueError("cron expression never fires (e.g. February 30)")


def _field(text: str, lo: int, hi: int, name: str) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        body, _, step_text = part.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if body == "*":
                start, end = lo, hi
            elif "-" in body:
                a, b = body.split("-", 1)
                start, end = int(a), int(b)
            else:
                start = int(body)
                end = hi if step_text else start
        except ValueError:
            raise ValueError(f"cron {name} field {text!r} is not a number, range or list"
                             ) from None
        if step < 1 or not lo <= start <= end <= hi:
            raise ValueError(f"cron {name} field {text!r} is out of range {lo}-{hi}")
        out.update(range(start, end + 1, step))
    return frozenset(out)
