"""Create or edit a QoS profile; saving an edit re-shapes every attached link at once.

Values are typed as ``tc`` users type them (``8mbit``, ``32kb``, ``40ms``, ``1%``) and parsed
by the CLI's own parsers, then checked by the core's pure :func:`validate_qos_spec` before
anything is sent, so a bad value is named under its field without a round trip. The form
calls the core itself (``save``) and stays open on an error, so a refusal from the core lands
under the field too. Settings the form does not show (queue size, LoRa preamble, path-loss
model...) are kept from the profile being edited.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Button, Checkbox, Input, Label, Select

from ..cli_units import (
    parse_coding_rate,
    parse_distance_m,
    parse_int,
    parse_loss,
    parse_number,
    parse_pct,
    parse_rate,
    parse_size,
    parse_time_ms,
)
from ..core.errors import InfraSimError, InvalidSpec
from ..core.model import LoraSpec, QosProfile, QosProfileSpec
from ..core.qos import DIRECTIONS, DISTRIBUTIONS, validate_qos_spec
from ..core.validation import validate_name

Save = Callable[[str, QosProfileSpec], Awaitable[QosProfile]]

#: Text inputs: (field id = spec field, label, placeholder).
SHAPING: list[tuple[str, str, str]] = [
    ("rate_bps", "Rate", "8mbit, 512kbit; 0 unlimited"),
    ("burst_bytes", "Burst", "32kb; 0 default"),
    ("delay_ms", "Delay", "40ms"),
    ("jitter_ms", "Jitter", "5ms"),
    ("loss_pct", "Loss", "1% or gemodel:1%,30%"),
    ("duplicate_pct", "Duplicate", "0.1%"),
    ("reorder_pct", "Reorder", "1%"),
    ("seed", "Seed", "0: fresh per attach"),
]
LORA: list[tuple[str, str, str]] = [
    ("lora-spreading_factor", "SF", "7..12"),
    ("lora-distance_m", "Distance", "2km, 500m"),
    ("lora-tx_power_dbm", "TX power", "14dBm"),
    ("lora-duty_cycle_pct", "Duty cycle", "1%; 0 unlimited"),
]
SELECTS: dict[str, list[str]] = {
    "distribution": list(DISTRIBUTIONS),
    "direction": list(DIRECTIONS),
    "lora-bandwidth_khz": ["125", "250", "500"],
    "lora-coding_rate": ["4/5", "4/6", "4/7", "4/8"],
}
#: Core field names (``lora.x``, Gilbert-Elliott details) → the input that sets them.
FIELD_ALIASES = {"ge_p_pct": "loss_pct", "ge_r_pct": "loss_pct", "ge_bad_loss_pct": "loss_pct",
                 "ge_good_loss_pct": "loss_pct"}


# -- pure conversions ------------------------------------------------------------------------


def _num(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".") or "0"


def rate_text(bps: int) -> str:
    """Pure: bits/s as tc writes them, exactly (``8mbit``, ``1500kbit``, ``12345``)."""
    if bps <= 0:
        return "0"
    for factor, unit in ((10**9, "gbit"), (10**6, "mbit"), (10**3, "kbit")):
        if bps % factor == 0:
            return f"{bps // factor}{unit}"
    return str(bps)


def size_text(n: int) -> str:
    """Pure: bytes exactly, in binary units when whole (``32kb``, ``1mb``, ``1514``)."""
    if n <= 0:
        return "0"
    for shift, unit in ((20, "mb"), (10, "kb")):
        if n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def ms_text(ms: float) -> str:
    return f"{_num(ms)}ms" if ms else "0"


def pct_text(pct: float) -> str:
    return f"{_num(pct)}%"


def loss_text(spec: QosProfileSpec) -> str:
    """Pure: random loss (``1%``) or netem's Gilbert-Elliott model, every parameter."""
    if spec.ge_p_pct > 0:
        return (f"gemodel:{pct_text(spec.ge_p_pct)},{pct_text(spec.ge_r_pct)},"
                f"{pct_text(spec.ge_bad_loss_pct)},{pct_text(spec.ge_good_loss_pct)}")
    return pct_text(spec.loss_pct)


def form_values(spec: QosProfileSpec) -> dict[str, str]:
    """Pure: the text each field starts with for ``spec`` (LoRa fields from its defaults
    when the profile has no radio, so switching it on starts from sane values)."""
    lo = spec.lora or LoraSpec()
    return {
        "rate_bps": rate_text(spec.rate_bps),
        "burst_bytes": size_text(spec.burst_bytes),
        "delay_ms": ms_text(spec.delay_ms),
        "jitter_ms": ms_text(spec.jitter_ms),
        "distribution": spec.distribution,
        "loss_pct": loss_text(spec),
        "duplicate_pct": pct_text(spec.duplicate_pct),
        "reorder_pct": pct_text(spec.reorder_pct),
        "seed": str(spec.seed),
        "direction": spec.direction,
        "lora-spreading_factor": str(lo.spreading_factor),
        "lora-bandwidth_khz": str(lo.bandwidth_khz),
        "lora-coding_rate": f"4/{lo.coding_rate}",
        "lora-distance_m": f"{_num(lo.distance_m / 1000)}km" if lo.distance_m >= 1000 and
        lo.distance_m % 100 == 0 else f"{_num(lo.distance_m)}m",
        "lora-tx_power_dbm": f"{_num(lo.tx_power_dbm)}dBm",
        "lora-duty_cycle_pct": pct_text(lo.duty_cycle_pct),
    }


def _pct_field(text: str, field: str) -> float:
    """A percentage; in the form a bare number is a percentage too (the label says so)."""
    text = text.strip() or "0"
    return parse_pct(text if text.endswith("%") else f"{text}%", field)


def _ms_field(text: str, field: str) -> float:
    """A time; a bare number is milliseconds (the form's unit), unlike tc."""
    text = text.strip() or "0"
    try:
        float(text)
    except ValueError:
        return parse_time_ms(text, field)
    return parse_time_ms(f"{text}ms", field)


def build_spec(values: dict[str, str], lora: bool, base: QosProfileSpec) -> QosProfileSpec:
    """Pure: the spec the form describes, on top of ``base``; raises InvalidSpec naming the
    form field (its id) of the first bad value, after the core's own checks."""
    def get(field: str) -> str:
        return values.get(field, "").strip()

    loss_raw = get("loss_pct") or "0"
    if not loss_raw.lower().startswith("gemodel") and not loss_raw.endswith("%"):
        loss_raw += "%"
    loss = parse_loss(loss_raw, "loss_pct")
    lora_spec: LoraSpec | None = None
    if lora:
        sf = parse_int(get("lora-spreading_factor") or "7", "lora-spreading_factor")
        bw = parse_int(get("lora-bandwidth_khz") or "125", "lora-bandwidth_khz")
        lora_spec = dataclasses.replace(
            base.lora or LoraSpec(),
            spreading_factor=sf,
            bandwidth_khz=bw,
            coding_rate=parse_coding_rate(get("lora-coding_rate") or "4/5",
                                          "lora-coding_rate"),
            distance_m=parse_distance_m(get("lora-distance_m") or "0", "lora-distance_m"),
            tx_power_dbm=parse_number(get("lora-tx_power_dbm") or "14", "lora-tx_power_dbm",
                                      "dBm", signed=True),
            duty_cycle_pct=_pct_field(get("lora-duty_cycle_pct"), "lora-duty_cycle_pct"),
        )
        if sf == 6 and not lora_spec.implicit_header:  # SF6 works only this way
            lora_spec.implicit_header = True
    spec = dataclasses.replace(
        base,
        rate_bps=parse_rate(get("rate_bps") or "0", "rate_bps"),
        burst_bytes=parse_size(get("burst_bytes") or "0", "burst_bytes"),
        delay_ms=_ms_field(get("delay_ms"), "delay_ms"),
        jitter_ms=_ms_field(get("jitter_ms"), "jitter_ms"),
        distribution=get("distribution") or base.distribution,
        duplicate_pct=_pct_field(get("duplicate_pct"), "duplicate_pct"),
        reorder_pct=_pct_field(get("reorder_pct"), "reorder_pct"),
        seed=parse_int(get("seed") or "0", "seed"),
        direction=get("direction") or base.direction,
        lora=lora_spec,
        loss_pct=loss["loss_pct"],
        ge_p_pct=loss["ge_p_pct"],
        ge_r_pct=loss["ge_r_pct"],
        ge_bad_loss_pct=loss["ge_bad_loss_pct"],
        ge_good_loss_pct=loss["ge_good_loss_pct"],
    )
    try:
        validate_qos_spec(spec)
    except InvalidSpec as err:
        raise InvalidSpec(field_of(err.field), err.reason) from None
    return spec


def field_of(core_field: str) -> str:
    """Pure: the form field that sets a core field (``lora.distance_m`` → its input)."""
    name = core_field.split(" (", 1)[0]  # "loss_pct (R)": one part of the GE model
    name = FIELD_ALIASES.get(name, name)
    return name.replace("lora.", "lora-", 1) if name.startswith("lora.") else name


# -- the modal -------------------------------------------------------------------------------


class QosForm(ModalScreen[QosProfile | None]):
    """New profile (``profile`` None: a name field) or an edit; dismisses with the saved
    profile, or None when cancelled."""

    DEFAULT_CSS = """
    QosForm { align: center middle; }
    QosForm #qos-form {
        width: 96; height: auto; max-height: 95%; padding: 0 1; border: thick $primary;
        background: $panel;
    }
    QosForm #qos-title { text-style: bold; margin: 0 0 1 0; }
    QosForm #qos-columns { height: auto; }
    QosForm .qos-column { width: 1fr; height: auto; padding: 0 1; }
    QosForm .qos-heading { color: $text-muted; text-style: bold; margin-bottom: 1; }
    QosForm .qos-row { height: 1; }
    QosForm .qos-label { width: 11; }
    QosForm .qos-row Input, QosForm .qos-row Select { width: 1fr; }
    QosForm .qos-row Input.-invalid { color: $error; text-style: bold; }
    QosForm .field-error { height: auto; color: $error; margin-left: 11; }
    QosForm .field-error.-empty { display: none; }
    QosForm #lora { margin-bottom: 1; }
    QosForm #qos-buttons { margin-top: 1; }
    QosForm #qos-error { height: auto; color: $error; }
    QosForm #qos-error.-empty { display: none; }
    QosForm #qos-buttons { height: auto; align: right middle; }
    QosForm #qos-buttons Button { margin-left: 1; }
    """

    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "save", "Save"),
    ]

    def __init__(self, profile: QosProfile | None, save: Save) -> None:
        super().__init__()
        self.profile = profile
        self.save_call = save
        self.base = dataclasses.replace(profile.spec) if profile else QosProfileSpec()
        self.values = form_values(self.base)
        self.error: tuple[str, str] | None = None  # (field, message) shown now
        self.saving = False

    @property
    def fields(self) -> list[str]:
        """Every input and select, in order (errors for anything else go to the bottom)."""
        names = [] if self.profile else ["name"]
        return names + [f for f, _, _ in SHAPING] + ["distribution", "direction", "lora"] + \
            [f for f, _, _ in LORA] + ["lora-bandwidth_khz", "lora-coding_rate"]

    def compose(self) -> ComposeResult:
        if self.profile is None:
            title = "New QoS profile — Enter saves, Esc cancels"
        else:
            users = len(self.profile.status.attached_vm_ids)
            title = (f"Edit QoS profile {self.profile.meta.name} — applies live to "
                     f"{users} VM(s); Enter saves, Esc cancels")
        with Vertical(id="qos-form"):
            yield Label(title, id="qos-title", markup=False)
            if self.profile is None:
                yield from self._input("name", "Name", "e.g. lossy-wan", "")
            with Horizontal(id="qos-columns"):
                with Vertical(classes="qos-column"):
                    yield Label("Shaping", classes="qos-heading")
                    for field, label, hint in SHAPING[:4]:
                        yield from self._input(field, label, hint, self.values[field])
                    yield from self._select("distribution", "Distrib.")
                    for field, label, hint in SHAPING[4:]:
                        yield from self._input(field, label, hint, self.values[field])
                    yield from self._select("direction", "Direction")
                with Vertical(classes="qos-column"):
                    yield Label("Radio", classes="qos-heading")
                    yield Checkbox("LoRa link (frames go over the air)",
                                   self.base.lora is not None, id="lora", compact=True)
                    yield from self._input(*LORA[0], self.values[LORA[0][0]])
                    yield from self._select("lora-bandwidth_khz", "BW kHz")
                    yield from self._select("lora-coding_rate", "Coding")
                    for field, label, hint in LORA[1:]:
                        yield from self._input(field, label, hint, self.values[field])
            yield Label("", id="qos-error", classes="-empty", markup=False)
            with Horizontal(id="qos-buttons"):
                yield Button("Save", id="ok", variant="primary", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def _input(self, field: str, label: str, hint: str, value: str) -> ComposeResult:
        with Horizontal(classes="qos-row"):
            yield Label(label, classes="qos-label")
            yield Input(value, placeholder=hint, id=field, compact=True, validate_on=(),
                        select_on_focus=False)
        yield Label("", id=f"{field}-error", classes="field-error -empty", markup=False)

    def _select(self, field: str, label: str) -> ComposeResult:
        options = SELECTS[field]
        value = self.values[field]
        with Horizontal(classes="qos-row"):
            yield Label(label, classes="qos-label")
            yield Select([(o, o) for o in options], value=value if value in options else
                         options[0], allow_blank=False, id=field, compact=True)
        yield Label("", id=f"{field}-error", classes="field-error -empty", markup=False)

    def on_mount(self) -> None:
        self._lora_enabled(self.base.lora is not None)
        first = "name" if self.profile is None else "rate_bps"
        self.query_one(f"#{first}", Input).focus()

    # -- values and errors ------------------------------------------------------------------

    def _lora_enabled(self, on: bool) -> None:
        for field in [f for f, _, _ in LORA] + ["lora-bandwidth_khz", "lora-coding_rate"]:
            self.query_one(f"#{field}").disabled = not on

    @on(Checkbox.Changed, "#lora")
    def _lora_toggled(self, event: Checkbox.Changed) -> None:
        self._lora_enabled(event.value)

    def current_values(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for node in self.query(Input):
            if node.id:
                out[node.id] = node.value
        for sel in self.query(Select):
            if sel.id:
                out[sel.id] = str(sel.value)
        return out

    def show_error(self, field: str, message: str) -> None:
        """Under the field when the form has it, else on the line above the buttons."""
        self.clear_error()
        self.error = (field, message)
        widget: Widget | None = None
        label = self.query_one("#qos-error", Label)
        if field in self.fields:
            label = self.query_one(f"#{field}-error", Label) if field != "lora" else label
            widget = self.query_one(f"#{field}")
        elif field:  # one the form does not show (queue_bytes, lora.preamble...)
            message = f"{field}: {message}"
        label.update(message)
        label.remove_class("-empty")
        if widget is not None:
            widget.add_class("-invalid")
            widget.focus()

    def clear_error(self) -> None:
        self.error = None
        for label in self.query(".field-error, #qos-error"):
            label.add_class("-empty")
        for node in self.query(".-invalid"):
            node.remove_class("-invalid")

    def on_input_changed(self, event: Input.Changed) -> None:
        if self.error is not None and event.input.id == self.error[0]:
            self.clear_error()

    # -- saving -----------------------------------------------------------------------------

    def spec(self) -> tuple[str, QosProfileSpec]:
        """(name, spec) from the fields; raises InvalidSpec naming the field."""
        values = self.current_values()
        if self.profile is None:
            name = values.get("name", "").strip()
            try:
                validate_name(name)
            except InvalidSpec as err:
                raise InvalidSpec("name", err.reason) from None
        else:
            name = self.profile.meta.name
        lora = self.query_one("#lora", Checkbox).value
        return name, build_spec(values, lora, self.base)

    def action_save(self) -> None:
        if self.saving:
            return
        try:
            name, spec = self.spec()
        except InvalidSpec as err:
            self.show_error(err.field, err.reason)
            return
        self.clear_error()
        self.saving = True
        self.run_worker(self._save(name, spec), group="qos-save", exit_on_error=False)

    async def _save(self, name: str, spec: QosProfileSpec) -> None:
        try:
            saved = await self.save_call(name, spec)
        except InvalidSpec as err:
            self.show_error(field_of(err.field), err.reason)
        except InfraSimError as err:
            self.show_error("", err.message)
        except Exception as err:  # a broken daemon must not close the form with the values
            self.show_error("", f"{type(err).__name__}: {err}")
        else:
            self.dismiss(saved)
        finally:
            self.saving = False

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_save()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "ok":
            self.action_save()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)


__all__ = ["QosForm", "build_spec", "field_of", "form_values", "loss_text", "rate_text",
           "size_text"]
