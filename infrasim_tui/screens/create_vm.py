"""Create a VM: a form checked by the core as it is typed.

Every change is checked (debounced) with the same validation ``create_vm`` runs, so the error
shown under a field is exactly what Create would say, and Create stays disabled until the core
has nothing to object to. Kernel, initrd and cmdline are prefilled from the test guest kit when
one is already built (never building one here: that takes minutes and needs apt).
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.timer import Timer
from textual.widget import Widget
from textual.widgets import Button, Checkbox, Header, Input, Label, Select

from ..cli_args import parse_pairs
from ..core.errors import InfraSimError, InvalidSpec, NotFound
from ..core.guest import GuestKit, find_cached_guest
from ..core.model import VM, Machine, PortForward, VMSpec
from ..core.validation import RASPI3B_CPUS, RASPI3B_MEMORY_MB
from ..widgets.key_bar import KeyBar

if TYPE_CHECKING:
    from ..app import InfraSimApp

log = logging.getLogger(__name__)

DEBOUNCE = 0.25  # seconds after the last keystroke before asking the core
DEFAULTS = {Machine.VIRT: ("1", "256"), Machine.RASPI3B: (str(RASPI3B_CPUS),
                                                          str(RASPI3B_MEMORY_MB))}
KIT_FLAVOUR = {Machine.VIRT: "cloud", Machine.RASPI3B: "generic"}
#: Input ids of the form, in order; InvalidSpec fields map onto them (see :func:`field_of`).
FIELDS = ("name", "machine", "cpu_cores", "memory_mb", "kernel", "initrd", "cmdline", "dtb",
          "boot", "volumes", "port_forwards", "labels")
LABELS = {"name": "Name", "machine": "Machine", "cpu_cores": "CPU cores",
          "memory_mb": "Memory (MiB)", "kernel": "Kernel", "initrd": "Initrd",
          "cmdline": "Kernel cmdline", "dtb": "Device tree", "boot": "Boot volume",
          "volumes": "Extra volumes", "port_forwards": "Port forwards", "labels": "Labels"}
HINTS = {"name": "lowercase letters, digits, -", "kernel": "/path/to/vmlinuz",
         "initrd": "/path/to/initrd (optional)", "cmdline": "optional",
         "dtb": "raspi3b only", "volumes": "names, comma-separated (optional)",
         "port_forwards": "e.g. 8080:80,2222:22/udp", "labels": "e.g. app=web,tier=1"}


@dataclass
class FormValues:
    """The form as typed (all text, as the widgets hold it)."""

    name: str = ""
    machine: str = Machine.VIRT.value
    cpu_cores: str = "1"
    memory_mb: str = "256"
    kernel: str = ""
    initrd: str = ""
    cmdline: str = ""
    dtb: str = ""
    boot: str = ""
    volumes: str = ""
    port_forwards: str = ""
    labels: str = ""
    start: bool = False
    extra: dict[str, str] = field(default_factory=dict)


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _int(text: str, name: str, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise InvalidSpec(name, f"{text.strip() or 'nothing'!r} is not a whole number of "
                          f"{what}") from None


def _path(text: str) -> str:
    text = text.strip()
    return str(Path(text).expanduser().absolute()) if text else ""


def build_request(v: FormValues) -> tuple[str, VMSpec, dict[str, str]]:
    """Pure: (name, spec, labels) from the form, parsed as the CLI parses its flags.

    Raises InvalidSpec naming the field as the core would (``port_forwards[1]``, ``labels``…).
    """
    name = v.name.strip()
    if not name:
        raise InvalidSpec("name", "a VM needs a name")
    try:
        machine = Machine(v.machine)
    except ValueError:
        raise InvalidSpec("machine", f"{v.machine!r}: use virt or raspi3b") from None
    forwards = []
    for i, text in enumerate(_split(v.port_forwards)):
        try:
            forwards.append(PortForward.parse(text))
        except ValueError as exc:
            raise InvalidSpec(f"port_forwards[{i}]", str(exc)) from None
    labels = parse_pairs(_split(v.labels), "labels")
    boot = v.boot.strip()
    volumes = ([boot] if boot else []) + [n for n in _split(v.volumes) if n != boot]
    spec = VMSpec(machine=machine, cpu_cores=_int(v.cpu_cores, "cpu_cores", "cores"),
                  memory_mb=_int(v.memory_mb, "memory_mb", "MiB"), kernel=_path(v.kernel),
                  initrd=_path(v.initrd), cmdline=v.cmdline.strip(), dtb=_path(v.dtb),
                  volume_ids=volumes, boot_disk_id=boot, port_forwards=forwards)
    return name, spec, labels


def field_of(err_field: str, has_boot: bool) -> str:
    """Pure: the form input an InvalidSpec field names ("" when no input holds it).

    ``spec.memory_mb`` → ``memory_mb``; ``port_forwards[0].host_port`` → ``port_forwards``;
    ``labels.tier`` → ``labels``; ``volume_ids[0]`` → ``boot`` when a boot volume is chosen
    (it is listed first), otherwise ``volumes``.
    """
    f = err_field.removeprefix("spec.")
    head = re.split(r"[\[.]", f, maxsplit=1)[0]
    if head == "volume_ids":
        m = re.match(r"volume_ids\[(\d+)\]", f)
        return "boot" if has_boot and m is not None and m.group(1) == "0" else "volumes"
    if head == "boot_disk_id":
        return "boot"
    return head if head in FIELDS else ""


def default_cmdline(name: str) -> str:
    """The demo's kernel command line for a VM called ``name``."""
    return f"infrasim.hostname={name} cryptomgr.notests" if name else "cryptomgr.notests"


class CreateVMScreen(Screen[None]):
    """The create form. ctrl+s (or the button) creates; Esc cancels."""

    DEFAULT_CSS = """
    CreateVMScreen #create-form { height: 1fr; padding: 0 2; }
    CreateVMScreen .form-row { height: auto; margin-bottom: 1; }
    CreateVMScreen .form-label { width: 18; }
    CreateVMScreen .form-row Input { height: 1; border: none; padding: 0 1; }
    CreateVMScreen .form-row Input.-invalid { border: none; background: $error 25%; }
    CreateVMScreen .form-row Input, CreateVMScreen .form-row Select { width: 1fr; }
    CreateVMScreen .field-error { height: auto; margin-left: 18; color: $error; }
    CreateVMScreen .field-error.-empty { display: none; }
    CreateVMScreen #form-error { height: auto; color: $error; }
    CreateVMScreen #form-error.-empty { display: none; }
    CreateVMScreen #create-buttons { height: auto; margin: 1 0; }
    CreateVMScreen #create-buttons Button { margin-right: 2; }
    CreateVMScreen #start { margin-left: 18; }
    """

    BINDINGS = [
        Binding("ctrl+s", "create", "Create"),
        Binding("escape", "cancel", "Cancel"),
    ]

    TITLE = "Create VM"

    def __init__(self, *, name: str = "") -> None:
        super().__init__()
        self.initial_name = name
        self.valid = False
        self.error: tuple[str, str] | None = None  # (field, message) the core last raised
        self.checks = 0  # validations finished (tests wait on it)
        self.kits: dict[str, GuestKit] = {}
        self._auto: dict[str, str] = {}  # input id -> the value we prefilled (still ours?)
        self._debounce: Timer | None = None
        self._creating = False

    @property
    def infrasim(self) -> InfraSimApp:
        return cast("InfraSimApp", self.app)

    # -- layout -----------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="create-form"):
            for fid in FIELDS:
                with Horizontal(classes="form-row"):
                    yield Label(LABELS[fid], classes="form-label")
                    yield self._widget(fid)
                yield Label("", id=f"{fid}-error", classes="field-error -empty", markup=False)
            yield Checkbox("Start after create", id="start")
            yield Label("", id="form-error", classes="-empty", markup=False)
            with Horizontal(id="create-buttons"):
                yield Button("Create (ctrl+s)", id="create", variant="primary", disabled=True)
                yield Button("Cancel (esc)", id="cancel")
        yield KeyBar()

    def _widget(self, fid: str) -> Widget:
        if fid == "machine":
            return Select([(m.value, m.value) for m in Machine], value=Machine.VIRT.value,
                          allow_blank=False, id="machine")
        if fid == "boot":
            return Select([], prompt="none (direct kernel boot)", id="boot")
        kind: Any = "integer" if fid in ("cpu_cores", "memory_mb") else "text"
        value = {"name": self.initial_name, "cpu_cores": DEFAULTS[Machine.VIRT][0],
                 "memory_mb": DEFAULTS[Machine.VIRT][1]}.get(fid, "")
        return Input(value, placeholder=HINTS.get(fid, ""), id=fid, type=kind,
                     validate_on=())  # the core validates; the input never resets our mark

    def on_mount(self) -> None:
        self.query_one("#name", Input).focus()
        self.run_worker(self._load(), group="create-vm-load", exit_on_error=False)

    async def _load(self) -> None:
        """Boot volume choices and the cached guest kits, then the first check."""
        try:
            vols = await self.infrasim.core.list_volumes()
        except InfraSimError as err:
            self.infrasim.report(err)
            vols = []
        self.query_one("#boot", Select).set_options(
            (v.meta.name, v.meta.name) for v in sorted(vols, key=lambda v: v.meta.name))
        kits = await asyncio.to_thread(_cached_kits)
        self.kits = kits
        self._prefill(Machine(self.values().machine))
        self.schedule_check(0)

    def _prefill(self, machine: Machine) -> None:
        """Fill kernel/initrd/dtb/cmdline from the machine's kit where the operator has not
        typed anything of their own (an earlier prefill may be replaced)."""
        kit = self.kits.get(KIT_FLAVOUR[machine])
        wanted = {
            "kernel": str(kit.kernel) if kit else "",
            "initrd": str(kit.initrd) if kit else "",
            "dtb": str(kit.dtb) if kit and kit.dtb and machine == Machine.RASPI3B else "",
            "cmdline": default_cmdline(self.values().name.strip()) if kit else "",
        }
        for fid, value in wanted.items():
            box = self.query_one(f"#{fid}", Input)
            if box.value in ("", self._auto.get(fid)):
                self._auto[fid] = value
                box.value = value

    # -- values and validation --------------------------------------------------------------

    def values(self) -> FormValues:
        v = FormValues()
        for fid in FIELDS:
            w = self.query_one(f"#{fid}")
            if isinstance(w, Input):
                setattr(v, fid, w.value)
            elif isinstance(w, Select):
                setattr(v, fid, "" if w.value is Select.NULL else str(w.value))
        v.start = self.query_one("#start", Checkbox).value
        return v

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "name":
            box = self.query_one("#cmdline", Input)
            if box.value and box.value == self._auto.get("cmdline"):
                self._auto["cmdline"] = box.value = default_cmdline(event.value.strip())
        self.schedule_check()

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "machine" and event.value is not Select.NULL:
            machine = Machine(str(event.value))
            other = Machine.VIRT if machine == Machine.RASPI3B else Machine.RASPI3B
            for fid, old, new in zip(("cpu_cores", "memory_mb"), DEFAULTS[other],
                                     DEFAULTS[machine], strict=True):
                box = self.query_one(f"#{fid}", Input)
                if box.value in ("", old):
                    box.value = new
            if self.kits:
                self._prefill(machine)
        self.schedule_check()

    def schedule_check(self, delay: float = DEBOUNCE) -> None:
        """Check the form ``delay`` after the last change (each change restarts the wait)."""
        if self._debounce is not None:
            self._debounce.stop()
        self._debounce = self.set_timer(max(delay, 0.01), self._fire_check)

    def _fire_check(self) -> None:
        self._debounce = None
        self.run_worker(self.check(), group="create-vm-check", exclusive=True,
                        exit_on_error=False)

    async def check(self) -> bool:
        """Ask the core whether the form would be created; show its objection inline."""
        values = self.values()
        error: tuple[str, str] | None = None
        try:
            name, spec, labels = build_request(values)
            await self.infrasim.session.validate(name, spec, labels)
            if await self._exists(name):
                raise InvalidSpec("name", f"a VM named {name!r} already exists")
        except InvalidSpec as err:
            error = (field_of(err.field, bool(values.boot.strip())) or err.field, err.reason)
        except InfraSimError as err:
            error = ("", err.message)
        except Exception as err:  # a bug must not leave the form looking valid
            log.exception("create form check failed")
            error = ("", f"{type(err).__name__}: {err}")
        self.show_error(error)
        self.checks += 1
        return error is None

    async def _exists(self, name: str) -> bool:
        try:
            vm: VM = await self.infrasim.core.get_vm(name)
        except NotFound:
            return False
        return vm.meta.name == name

    def show_error(self, error: tuple[str, str] | None) -> None:
        """Mark the one field the core objects to (or the whole form), clearing the rest."""
        self.error = error
        self.valid = error is None
        target = error[0] if error is not None and error[0] in FIELDS else ""
        for fid in FIELDS:
            mine = error is not None and fid == target
            label = self.query_one(f"#{fid}-error", Label)
            label.update(error[1] if mine and error is not None else "")
            label.set_class(not mine, "-empty")
            self.query_one(f"#{fid}").set_class(mine, "-invalid")
        loose = ""
        if error is not None and not target:
            loose = f"{error[0]}: {error[1]}" if error[0] else error[1]
        general = self.query_one("#form-error", Label)
        general.update(loose)
        general.set_class(not loose, "-empty")
        self.query_one("#create", Button).disabled = not self.valid or self._creating
        self.refresh_bindings()

    # -- actions ----------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "create":
            if not self.infrasim.can("create_vm"):
                return False
            return True if self.valid and not self._creating else None
        return True

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "create":
            self.action_create()
        elif event.button.id == "cancel":
            self.action_cancel()

    def action_cancel(self) -> None:
        if self.is_current:
            self.app.pop_screen()

    def action_create(self) -> None:
        if self._creating:
            return
        self.run_worker(self._create(), group="create-vm-create", exclusive=True,
                        exit_on_error=False)

    async def _create(self) -> None:
        if self._debounce is not None:  # a change not yet checked: check it now
            self._debounce.stop()
            self._debounce = None
        if not await self.check():
            return
        values = self.values()
        name, spec, labels = build_request(values)
        core = self.infrasim.core
        self._creating = True
        self.show_error(None)

        async def work() -> VM:
            try:
                vm: VM = await core.create_vm(name, spec, labels, start=values.start)
            except InvalidSpec as err:
                self._creating = False
                self.show_error((field_of(err.field, bool(spec.boot_disk_id)) or err.field,
                                 err.reason))
                raise
            except BaseException:
                self._creating = False
                self.show_error(None)
                raise
            return vm

        done = f"{name} created" + (" and started" if values.start else "")
        self.infrasim.act(work, done=done, then=self._created)

    def _created(self, vm: VM) -> None:
        self._creating = False
        if self.is_current:
            self.app.pop_screen()
        self.infrasim.open_vm(vm.meta.name)


def _cached_kits() -> dict[str, GuestKit]:
    """The newest already-built kit of each flavour (reads the cache; builds nothing)."""
    kits = {}
    for flavour in set(KIT_FLAVOUR.values()):
        try:
            kit = find_cached_guest(flavour)
        except (InfraSimError, OSError, ValueError):
            kit = None
        if kit is not None:
            kits[flavour] = kit
    return kits


__all__ = ["CreateVMScreen", "FormValues", "build_request", "default_cmdline", "field_of"]
