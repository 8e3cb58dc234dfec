"""Option callbacks shared by the ``omnisage`` commands."""

from __future__ import annotations

from datetime import date

import click


def iso_date(ctx, param, value):
    """A click callback: ``value`` when it is a YYYY-MM-DD date (or None), else a BadParameter."""
    if value is None:
        return value
    try:
        date.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not YYYY-MM-DD") from exc
    return value
