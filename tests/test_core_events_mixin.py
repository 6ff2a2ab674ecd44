"""Views that follow the core's events stop receiving them once they are gone."""

from __future__ import annotations

from infrasim_tui.app import InfraSimApp
from infrasim_tui.screens.events import EventsScreen

from .console_fakes import static_session


async def test_listeners_are_dropped_with_their_views() -> None:
    session = static_session()
    app = InfraSimApp(session)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.pause(0.3)
        base = len(session._listeners)  # the dashboard (and whatever the app follows)
        assert base >= 1
        app.push_screen(EventsScreen())
        await pilot.pause(0.3)
        assert len(session._listeners) == base + 1
        app.pop_screen()
        await pilot.pause(0.3)
        assert len(session._listeners) == base
    assert len(session._listeners) == 0
