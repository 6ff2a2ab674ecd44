"""The operator console: a Textual app over one :class:`~infrasim_tui.session.Session`.

The app holds no state of its own beyond navigation and preferences: screens read the core
through ``app.core`` (the session's core wrapped in the role guard, so ``--read-only`` is
refused by the API, not only hidden) and refresh from the session's pushed events. Every
action goes through :meth:`InfraSimApp.act`, which checks the role, runs the call as a worker
and turns core errors into notifications that name the field.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.css.errors import StylesheetError
from textual.screen import Screen

from .core.access import GuardedCore, Role, allowed
from .core.errors import InfraSimError, InvalidSpec, PermissionDenied
from .core.model import VM
from .session import Session

log = logging.getLogger(__name__)

REPO_THEMES = Path(__file__).resolve().parent.parent / "themes"
DEFAULT_THEME = "dark"


def themes_dirs() -> list[Path]:
    """Where ``NAME.tcss`` themes live: the project's ``themes/`` then the user's own."""
    dirs = [Path(p) for p in os.environ.get("INFRASIM_THEMES", "").split(os.pathsep) if p]
    dirs.append(REPO_THEMES)
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    dirs.append(Path(xdg) / "infrasim" / "themes")
    return dirs


def available_themes() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in themes_dirs():
        if d.is_dir():
            for p in sorted(d.glob("*.tcss")):
                found.setdefault(p.stem, p)
    return found


def theme_base(path: Path) -> str:
    """The Textual colour theme a ``.tcss`` theme builds on, from its ``base:`` header line."""
    for line in path.read_text().splitlines()[:5]:
        if "base:" in line:
            return line.split("base:", 1)[1].strip(" */")
    return "textual-dark"


class SharedParseCache:
    """Parsed CSS shared by every console app in the process (each SSH session is one).

    Textual keeps a parse cache per app, so every new session tokenised all the widgets'
    CSS again (~15 ms, and its own copy of the rules in memory). The rules depend on the CSS
    and on the theme's variables, so both are in the key; nothing can go stale, and
    ``clear()`` (called when a theme changes) has nothing to drop.
    """

    _rules: dict[tuple[object, ...], object] = {}
    LIMIT = 1024

    def __init__(self, stylesheet: object) -> None:
        self._sheet = stylesheet
        self._vars: object = None  # the variables dict the key was computed from (kept alive)
        self._vars_key: tuple[object, ...] = ()

    def _key(self, key: object) -> tuple[object, ...]:
        variables = getattr(self._sheet, "_variables", {})
        if variables is not self._vars:
            self._vars = variables
            self._vars_key = tuple(sorted(variables.items()))
        return (self._vars_key, key)

    def __getitem__(self, key: object) -> object:
        return self._rules[self._key(key)]

    def __setitem__(self, key: object, value: object) -> None:
        if len(self._rules) >= self.LIMIT:
            self._rules.clear()
        self._rules[self._key(key)] = value

    def clear(self) -> None:
        self._vars = None


def error_text(err: BaseException) -> tuple[str, str]:
    """Pure: (title, message) of a notification for an error from the core."""
    if isinstance(err, InvalidSpec):
        return f"Invalid {err.field}", f"{err.field}: {err.reason}"
    if isinstance(err, PermissionDenied):
        return "Not allowed", err.message
    if isinstance(err, InfraSimError):
        return type(err).__name__, err.message
    return "Error", f"{type(err).__name__}: {err}"


class InfraSimApp(App[int]):
    """The console. ``session`` is shared (one per process); ``role`` is this viewer's."""

    TITLE = "InfraSim"
    ENABLE_COMMAND_PALETTE = True
    BINDINGS = [
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("colon", "command_line", "Cmd", key_display=":"),
        Binding("q", "quit", "Quit"),
        Binding("escape", "go_back", "Back", show=False),
        Binding("alt+left", "go_back", "Back", show=False),
        Binding("alt+right", "forward", "Forward", show=False),
        Binding("ctrl+t", "next_theme", "Theme", show=False),
        Binding("N", "open_named('networks')", "Networks", show=False),
    ]

    def __init__(self, session: Session, *, role: Role = Role.ADMIN, theme_name: str = "",
                 prefs_path: Path | None = None, clock: Callable[[], float] = time.time,
                 start_vm: str = "") -> None:
        self.session = session
        self.role = role
        self.core: Any = GuardedCore(session.core, role)
        self.clock = clock
        self.prefs_path = prefs_path
        self.prefs = self._load_prefs()
        self.themes = available_themes()
        wanted = theme_name or str(self.prefs.get("theme", DEFAULT_THEME))
        self.theme_name = wanted if wanted in self.themes else DEFAULT_THEME
        super().__init__(css_path=[str(self.themes[self.theme_name])] if self.themes else None)
        self.stylesheet._parse_cache = SharedParseCache(self.stylesheet)  # type: ignore[assignment]
        if self.themes:
            self.theme = theme_base(self.themes[self.theme_name])
        self.start_vm = start_vm
        self._forward: list[Callable[[], Screen[Any]]] = []
        self.vm_cache: dict[str, VM] = {}  # id -> last seen, for the palette and `:` commands

    # -- permissions and actions ------------------------------------------------------------

    @property
    def mode_label(self) -> str:
        """What the header shows after the counts (SSH sessions add the host key)."""
        return str(self.session.mode)

    @property
    def read_only(self) -> bool:
        return self.role == Role.VIEWER

    def can(self, action: str) -> bool:
        return allowed(self.role, action)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "create_vm":
            return self.can("create_vm")
        return True

    def check_action_allowed(self, action: str) -> bool:
        """For widgets (the console's input): True when allowed, else say why and refuse."""
        if allowed(self.role, action):
            return True
        try:
            self.core.check(action)
        except PermissionDenied as err:
            self.report(err)
        return False

    def report(self, err: BaseException) -> None:
        title, message = error_text(err)
        self.notify(message, title=title, severity="error", timeout=8)

    def act(self, work: Callable[[], Awaitable[Any]], *, done: str = "",
            then: Callable[[Any], None] | None = None, group: str = "core") -> None:
        """Run a core call in a worker; errors become notifications, never crashes."""

        async def run() -> None:
            try:
                result = await work()
            except InfraSimError as err:
                self.report(err)
                return
            except Exception as err:  # an unexpected failure still must not kill the console
                log.exception("action failed")
                self.report(err)
                return
            if done:
                self.notify(done, timeout=4)
            if then is not None:
                then(result)

        self.run_worker(run(), group=group, exit_on_error=False)

    # -- navigation -------------------------------------------------------------------------

    async def on_mount(self) -> None:
        from .screens.dashboard import DashboardScreen

        await self.session.start()  # idempotent: usually started by whoever made the session
        self.push_screen(DashboardScreen())
        if self.start_vm:
            from .screens.vm_detail import VMScreen

            ref = self.start_vm
            self.go(lambda: VMScreen(ref, focus_console=True))
            self.notify("Keys go to the guest's console; Ctrl+] gives them back to InfraSim "
                        "(then ? lists every key, Esc goes to the fleet).", timeout=10)

    def go(self, make: Callable[[], Screen[Any]]) -> None:
        """Open a screen on top of the current one (back returns), clearing forward history."""
        self._forward.clear()
        self.push_screen(make())

    def open_vm(self, ref: str) -> None:
        from .screens.vm_detail import VMScreen

        self.go(lambda: VMScreen(ref))

    def open_named(self, name: str) -> None:
        """Screens by name, for `:` commands and the palette."""
        from .screens.events import EventsScreen
        from .screens.networks import NetworksScreen
        from .screens.volumes import VolumesScreen

        if name in ("vms", "dashboard", "home"):
            while len(self.screen_stack) > 2:
                self.pop_screen()
            return
        make: dict[str, Callable[[], Screen[Any]]] = {
            "volumes": VolumesScreen, "events": EventsScreen, "networks": NetworksScreen,
        }
        if name in make:
            self.go(make[name])

    def action_open_named(self, name: str) -> None:
        self.open_named(name)

    def action_go_back(self) -> None:
        if len(self.screen_stack) > 2:
            screen = self.screen
            factory = getattr(screen, "recreate", None)
            self.pop_screen()
            if callable(factory):
                self._forward.append(factory)

    def action_forward(self) -> None:
        if self._forward:
            self.push_screen(self._forward.pop()())

    def action_help(self) -> None:
        from .screens.help import HelpScreen

        self.push_screen(HelpScreen(self.screen))

    def action_command_line(self) -> None:
        from .screens.command_line import CommandLine

        self.push_screen(CommandLine(), self.run_command)

    def action_create_vm(self) -> None:
        from .screens.create_vm import CreateVMScreen

        if not self.check_action_allowed("create_vm"):
            return
        self.go(CreateVMScreen)

    # -- `:` commands -----------------------------------------------------------------------

    def run_command(self, line: str | None) -> None:
        from .screens.command_line import parse_command

        if not line:
            return
        try:
            verb, arg = parse_command(line)
        except ValueError as err:
            self.notify(str(err), title="Command", severity="warning")
            return
        if verb == "vm":
            self.open_vm(arg)
        elif verb in ("vms", "volumes", "events", "networks"):
            self.open_named(verb)
        elif verb == "snapshots":
            from .screens.vm_detail import VMScreen

            ref = arg or getattr(self.screen, "vm_ref", "")
            if not ref:
                self.notify("which VM? `:snapshots NAME`", severity="warning")
            else:
                self.go(lambda: VMScreen(ref, tab="snapshots"))
        elif verb == "new":
            self.action_create_vm()
        elif verb == "theme":
            self.set_theme(arg)
        elif verb == "help":
            self.action_help()
        elif verb == "quit":
            self.exit(0)
        elif verb in ("start", "stop", "pause", "resume", "restart"):
            self.lifecycle(verb, arg)

    def lifecycle(self, verb: str, ref: str, *, force: bool = False) -> None:
        method = f"{verb}_vm"
        if not self.check_action_allowed(method):
            return
        call = getattr(self.core, method)

        async def work() -> Any:
            return await (call(ref, force=True) if force else call(ref))

        self.act(work, done=f"{ref}: {verb}{' (forced)' if force else ''} done")

    # -- themes and preferences -------------------------------------------------------------

    def _load_prefs(self) -> dict[str, Any]:
        if self.prefs_path is None:
            return {}
        try:
            data = json.loads(self.prefs_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save_prefs(self) -> None:
        if self.prefs_path is None:
            return
        try:
            tmp = self.prefs_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.prefs, indent=2))
            tmp.replace(self.prefs_path)
        except OSError as err:
            log.warning("cannot save console preferences: %s", err)

    def set_theme(self, name: str) -> None:
        """Swap the theme's stylesheet live and remember the choice."""
        path = self.themes.get(name)
        if path is None:
            self.notify(f"no theme {name!r}; have {', '.join(sorted(self.themes))}",
                        title="Theme", severity="warning")
            return
        old = self.themes.get(self.theme_name)
        stylesheet = self.stylesheet.copy()
        if old is not None:
            for key in [k for k in stylesheet.source if k[0] == str(old)]:
                del stylesheet.source[key]
        try:
            stylesheet.read(path)
            stylesheet.parse()
        except (StylesheetError, Exception) as err:  # a broken user theme must not kill us
            self.report(err)
            return
        self.stylesheet = stylesheet
        self.theme_name = name
        self.theme = theme_base(path)
        self.stylesheet.update(self)
        for screen in self.screen_stack:
            self.stylesheet.update(screen)
        self.refresh_css()
        self.prefs["theme"] = name
        self._save_prefs()
        self.notify(f"theme {name}", timeout=2)

    def action_next_theme(self) -> None:
        names = sorted(self.themes)
        if names:
            i = names.index(self.theme_name) if self.theme_name in names else -1
            self.set_theme(names[(i + 1) % len(names)])

    # -- command palette --------------------------------------------------------------------

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield SystemCommand("Dashboard", "All VMs", lambda: self.open_named("vms"))
        yield SystemCommand("Volumes", "Volumes, images and integrity",
                            lambda: self.open_named("volumes"))
        yield SystemCommand("Events", "Everything the core reported",
                            lambda: self.open_named("events"))
        yield SystemCommand("Networks", "Segments, live links, LoRa radios and QoS profiles",
                            lambda: self.open_named("networks"))
        if self.can("create_vm"):
            yield SystemCommand("Create VM", "Open the create form", self.action_create_vm)
        yield SystemCommand("Help", "Every key of this view", self.action_help)
        for name in sorted(self.themes):
            yield SystemCommand(f"Theme: {name}", f"Switch to the {name} theme (remembered)",
                                lambda n=name: self.set_theme(n))
        for vm in sorted(self.vm_cache.values(), key=lambda v: v.meta.name):
            n = vm.meta.name
            yield SystemCommand(f"Open {n}", f"{vm.status.state.value.lower()} VM",
                                lambda n=n: self.open_vm(n))
            state = vm.status.state.value
            verbs = {"RUNNING": ("stop", "pause", "restart"), "PAUSED": ("resume", "stop"),
                     "STOPPED": ("start",), "ERROR": ("start",)}.get(state, ())
            for verb in verbs:
                if self.can(f"{verb}_vm"):
                    yield SystemCommand(f"{verb.capitalize()} {n}", f"{verb} the VM",
                                        lambda v=verb, n=n: self.lifecycle(v, n))
        yield SystemCommand("Quit", "Leave the console (VMs keep running)", lambda: self.exit(0))


__all__ = ["InfraSimApp", "available_themes", "error_text"]
