"""Small per-caller settings kept by the tracker, so that every ingress replica sees them.

The compatible APIs (`serve_app.api.compat`) need a little state per caller: the model an
AUTOMATIC1111 client selected with `POST /sdapi/v1/options`, and the job its `progress`
and `interrupt` calls mean. The tracker is the one place every ingress replica reaches,
so it keeps them, bounded: the most recently active callers, a few short values each.
They live in memory only; a restarted tracker has forgotten them, which a client sees as
the defaults again (the model) or no running job (progress), never as an error.
"""

from __future__ import annotations

from collections import OrderedDict

from serve_app.errors import InvalidRequest

MAX_CALLERS = 10_000
MAX_NAMES = 16
MAX_NAME_CHARS = 64
MAX_VALUE_CHARS = 512


class CallerNotes:
    """name -> value per caller (`Caller.client`), least recently used callers dropped."""

    def __init__(self, max_callers: int = MAX_CALLERS) -> None:
        self._max_callers = max_callers
        self._notes: OrderedDict[str, dict[str, str]] = OrderedDict()

    def remember(self, client: str, name: str, value: str | None) -> None:
        """Set `name` for `client`; None forgets it."""
        if not name or len(name) > MAX_NAME_CHARS or len(value or "") > MAX_VALUE_CHARS:
            raise InvalidRequest(
                f"A caller setting takes a name of 1-{MAX_NAME_CHARS} characters and a value "
                f"of at most {MAX_VALUE_CHARS}")
        notes = self._notes.pop(client, {})
        if value is None:
            notes.pop(name, None)
        elif name in notes or len(notes) < MAX_NAMES:
            notes[name] = value
        else:
            raise InvalidRequest(f"At most {MAX_NAMES} settings are kept per caller")
        if notes:
            self._notes[client] = notes
        while len(self._notes) > self._max_callers:
            self._notes.popitem(last=False)

    def recall(self, client: str) -> dict[str, str]:
        notes = self._notes.get(client)
        if notes is None:
            return {}
        self._notes.move_to_end(client)
        return dict(notes)
