"""The Volumes screen's modals: a new blank/overlay volume, an import, and one volume's details.

The forms turn text into a :class:`VolumeRequest` with the same parsing as the CLI (sizes by
``parse_size``, names by the core's own rule), so a form never accepts what the core refuses
for shape; the core still checks everything else (a missing base, a digest that differs).
"""

from __future__ import annotations

import time
from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.suggester import SuggestFromList
from textual.widgets import Button, Checkbox, Input, Label, Static

from ..core.errors import InvalidSpec
from ..core.model import Volume, VolumeRequest
from ..core.units import format_size, parse_size
from ..core.validation import validate_name

FORM_CSS = """
{cls} {{ align: center middle; }}
{cls} .volume-form {{
    width: 76; height: auto; max-height: 90%; padding: 1 2; border: thick $primary;
    background: $panel;
}}
{cls} .form-title {{ margin-bottom: 1; text-style: bold; }}
{cls} .field-error {{ height: auto; color: $error; }}
{cls} .field-error.-empty {{ display: none; }}
{cls} .form-buttons {{ height: auto; margin-top: 1; align: right middle; }}
{cls} .form-buttons Button {{ margin-left: 1; }}
"""


def _field(form: ModalScreen[VolumeRequest | None], field: str, message: str) -> None:
    label = form.query_one(f"#{field}-error", Label)
    label.update(message)
    label.set_class(not message, "-empty")
    form.query_one(f"#{field}", Input).set_class(bool(message), "-invalid")


class _VolumeForm(ModalScreen[VolumeRequest | None]):
    """Shared behaviour: Enter moves on / submits, Esc cancels, errors under their field."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]
    FIELDS: tuple[str, ...] = ()

    def __init__(self, volume_names: list[str] | None = None) -> None:
        super().__init__()
        self.volume_names = volume_names or []

    def on_mount(self) -> None:
        self.query_one(f"#{self.FIELDS[0]}", Input).focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id in self.FIELDS:
            _field(self, event.input.id, "")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        ids = list(self.FIELDS)
        i = ids.index(event.input.id) if event.input.id in ids else len(ids) - 1
        if i + 1 < len(ids):
            self.query_one(f"#{ids[i + 1]}", Input).focus()
        else:
            self.submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "ok":
            self.submit()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def value(self, field: str) -> str:
        return self.query_one(f"#{field}", Input).value.strip()

    def request(self) -> VolumeRequest:
        raise NotImplementedError

    def submit(self) -> None:
        try:
            req = self.request()
        except InvalidSpec as err:
            field = {"size_bytes": "size", "source_digest": "digest"}.get(err.field, err.field)
            if field not in self.FIELDS:
                field = self.FIELDS[0]
            _field(self, field, err.reason)
            self.query_one(f"#{field}", Input).focus()
            return
        self.dismiss(req)

    def buttons(self, ok: str) -> ComposeResult:
        with Horizontal(classes="form-buttons"):
            yield Button(ok, id="ok", variant="primary")
            yield Button("Cancel", id="cancel")

    def field(self, field: str, label: str, placeholder: str = "",
              suggest: list[str] | None = None) -> ComposeResult:
        yield Label(label)
        yield Input(placeholder=placeholder, id=field, validate_on=(),
                    suggester=SuggestFromList(suggest) if suggest else None)
        yield Label("", id=f"{field}-error", classes="field-error -empty",
                    markup=False)


class NewVolumeForm(_VolumeForm):
    """A blank qcow2 volume of a size, or a copy-on-write overlay on a base volume."""

    DEFAULT_CSS = FORM_CSS.format(cls="NewVolumeForm")
    FIELDS = ("name", "size", "base")

    def compose(self) -> ComposeResult:
        with Vertical(classes="volume-form"):
            yield Label("New volume — blank, or an overlay on a base", classes="form-title")
            yield from self.field("name", "Name", "e.g. data-1")
            yield from self.field("size", "Size", "e.g. 1G (optional for an overlay)")
            yield from self.field("base", "Base volume (optional)", "name of a volume",
                                  self.volume_names)
            yield from self.buttons("Create")

    def request(self) -> VolumeRequest:
        name, size_text, base = self.value("name"), self.value("size"), self.value("base")
        validate_name(name)
        if not size_text and not base:
            raise InvalidSpec("size", "a blank volume needs a size, e.g. 1G")
        size = parse_size(size_text) if size_text else 0
        return VolumeRequest(name=name, size_bytes=size, base=base)


class ImportVolumeForm(_VolumeForm):
    """An image from a local file or an http(s) URL, optionally pinned to a BLAKE3 digest."""

    DEFAULT_CSS = FORM_CSS.format(cls="ImportVolumeForm")
    FIELDS = ("name", "source", "digest")

    def compose(self) -> ComposeResult:
        with Vertical(classes="volume-form"):
            yield Label("Import a volume", classes="form-title")
            yield from self.field("name", "Name", "e.g. debian-base")
            yield from self.field("source", "Source", "/path/to/image.qcow2 or https://…")
            yield from self.field("digest", "BLAKE3 digest pin (optional)",
                                  "64 hex digits; refused if the image differs")
            yield Checkbox("Read-only (needed to sign it)", id="read-only")
            yield from self.buttons("Import")

    def request(self) -> VolumeRequest:
        name, source, digest = self.value("name"), self.value("source"), self.value("digest")
        validate_name(name)
        if not source:
            raise InvalidSpec("source", "give a file path or an http(s) URL")
        if "://" not in source:
            source = str(Path(source).expanduser().absolute())
        elif not source.startswith(("http://", "https://")):
            raise InvalidSpec("source", "only http:// and https:// URLs can be imported")
        digest = digest.lower()
        if digest and (len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)):
            raise InvalidSpec("digest", "a BLAKE3 digest is 64 hex digits")
        read_only = self.query_one("#read-only", Checkbox).value
        return VolumeRequest(name=name, source=source, source_digest=digest,
                             read_only=read_only)


def integrity_state(vol: Volume) -> str:
    """Pure: the integrity word the table shows for ``vol``.

    ``verified``, ``untrusted``, ``mismatch``, ``bad signature``, ``unsigned`` (checked, but
    there is no signature to check), or ``never checked``.
    """
    verdict = vol.status.verified
    if verdict:
        return verdict.replace("-", " ")
    return "unsigned" if vol.status.verified_at else "never checked"


def volume_details(vol: Volume, names: dict[str, str], users: list[str]) -> list[tuple[str, str]]:
    """Pure: (field, value) rows of everything the core knows about ``vol``."""
    integ = vol.spec.integrity
    when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(vol.status.verified_at))
            if vol.status.verified_at else "-")
    base = vol.spec.base_volume_id
    return [
        ("Name", vol.meta.name),
        ("ID", vol.meta.id),
        ("Kind", vol.spec.kind.value.lower()),
        ("Mode", "read-only" if vol.spec.read_only else "read-write"),
        ("Format", vol.spec.format),
        ("Virtual size", format_size(vol.status.virtual_size)),
        ("On disk", format_size(vol.status.actual_size)),
        ("Path", vol.status.path or "-"),
        ("Source", vol.spec.source or "-"),
        ("Source pin", vol.spec.source_digest or "-"),
        ("Base", f"{names.get(base, base)} ({base})" if base else "-"),
        ("Image digest", vol.status.image_digest or "-"),
        ("File digest", vol.status.digest or "-"),
        ("Signed", f"yes, key {integ.public_key[:16]}…" if integ else "no"),
        ("Signed digest", integ.expected_digest if integ else "-"),
        ("Integrity", integrity_state(vol)),
        ("Checked at", when),
        ("Check error", vol.status.verify_error or "-"),
        ("Used by", ", ".join(users) or "-"),
        ("Labels", ", ".join(f"{k}={v}" for k, v in sorted(vol.meta.labels.items())) or "-"),
    ]


class VolumeDetails(ModalScreen[None]):
    """Every field of one volume, read-only; Esc or Enter closes."""

    DEFAULT_CSS = """
    VolumeDetails { align: center middle; }
    VolumeDetails #volume-details {
        width: 100; height: auto; max-height: 90%; padding: 1 2; border: thick $primary;
        background: $panel;
    }
    VolumeDetails #volume-details-title { text-style: bold; margin-bottom: 1; }
    VolumeDetails #volume-details-body { height: auto; }
    """

    BINDINGS = [Binding("escape,enter,q", "close", "Close")]

    def __init__(self, rows: list[tuple[str, str]]) -> None:
        super().__init__()
        self.rows = rows

    def compose(self) -> ComposeResult:
        width = max(len(k) for k, _ in self.rows) + 2
        text = "\n".join(f"{k + ':':<{width}}{v}" for k, v in self.rows)
        name = dict(self.rows).get("Name", "")
        with VerticalScroll(id="volume-details"):
            yield Static(f"Volume {name} — Esc closes", id="volume-details-title", markup=False)
            yield Static(text, id="volume-details-body", markup=False)

    def action_close(self) -> None:
        self.dismiss(None)


__all__ = ["ImportVolumeForm", "NewVolumeForm", "VolumeDetails", "integrity_state",
           "volume_details"]
