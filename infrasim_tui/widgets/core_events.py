"""A mixin for screens and widgets that follow the session's core events.

Subscribing on mount and unsubscribing on unmount was written out in every view; a view that
forgot the second half would keep receiving events after it was gone. ``follow_core`` pairs
them: Textual runs this class's ``on_unmount`` along with the view's own handlers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..core.events import Event


class FollowsCore:
    _core_unlisten: Callable[[], None] | None = None

    def follow_core(self, listener: Callable[[Event], None]) -> None:
        """Deliver the session's events to ``listener`` until this node is unmounted.

        The listener runs in the session's task (maybe another app's context): it must only
        filter and set flags or ``call_later`` into its own app.
        """
        app: Any = getattr(self, "app")  # noqa: B009 - the DOM node this is mixed into
        self._core_unlisten = app.session.listen(listener)

    def on_unmount(self) -> None:
        if self._core_unlisten is not None:
            self._core_unlisten()
            self._core_unlisten = None
