"""``infrasim_vm``: a QEMU VM and its desired power state.

What users of the libvirt/Proxmox providers ask for, and how this resource answers:
- refresh is one ``GetVM`` (plus one list of volumes/networks to show names): it never talks to
  the guest, so ``terraform plan`` stays fast, and it shows drift (stopped or deleted outside
  terraform, spec changed);
- disks, networks and port forwards are sets keyed by name: reordering them changes nothing;
- :data:`FORCES_REPLACEMENT` and :data:`UPDATES_IN_PLACE` say what a change does; changes that
  need a restart are planned in place with a warning;
- "created" means QEMU runs, not that the guest booted; a start that fails after the VM exists
  returns its state with the error, so terraform taints it instead of forgetting it;
- import by id or name yields the same state a refresh gives, so a VM made with the CLI imports
  without a diff;
- the QoS profiles of its segment NICs (``qos_profile``, ``network_qos``) change in place without
  a restart: the daemon re-shapes the live links, the guest sees nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..framework import (
    UNKNOWN,
    ApplyResult,
    Attr,
    Block,
    Cancelled,
    Context,
    Diagnostics,
    PlanResult,
    Resource,
    Schema,
    null_object,
    wholly_known,
)
from .common import (
    FORCE_RESERVE_S,
    add_error,
    deadline_in,
    grace_seconds,
    guarded,
    is_planned,
    keep_empty,
    name_and_label_diags,
    note_planned,
    opt,
    parse_duration,
    path_of,
    remaining,
    replace_paths,
    same,
    settle,
    timeout_diags,
    timeouts_of,
    unknown_all,
)

if TYPE_CHECKING:
    from ...core.model import VM, VMSpec

#: Changing these destroys the VM and creates a new one.
FORCES_REPLACEMENT: tuple[str, ...] = ("name", "machine", "arch")
#: Changing these updates the VM in place (those in :data:`RESTART_REQUIRED` restart it).
UPDATES_IN_PLACE: tuple[str, ...] = (
    "cpu_cores", "memory_mb", "kernel", "initrd", "cmdline", "dtb", "boot_disk", "volumes",
    "networks", "port_forward", "accelerator", "compatibility_mode", "extra_args", "labels",
    "running", "shutdown_timeout", "timeouts", "qos_profile", "network_qos",
)
#: In-place changes QEMU only sees at its next start: a running VM is restarted to apply them
#: (gracefully, forced after the update timeout); a stopped one picks them up when started.
RESTART_REQUIRED: tuple[str, ...] = (
    "cpu_cores", "memory_mb", "kernel", "initrd", "cmdline", "dtb", "boot_disk", "volumes",
    "networks", "port_forward", "accelerator", "compatibility_mode", "extra_args",
)
#: Computed attributes that change whenever QEMU starts or stops.
RUNTIME: tuple[str, ...] = ("state", "pid", "accelerator_used", "console_path", "serial_log",
                            "qemu_version")
#: In-place changes the daemon applies live (the switch re-shapes the VM's links).
LIVE: tuple[str, ...] = ("qos_profile", "network_qos")
#: Seconds per operation when the ``timeouts`` block does not say.
DEFAULT_TIMEOUTS: dict[str, float] = {"create": 300.0, "update": 300.0, "delete": 120.0}
#: How long a stop waits for the guest to power off before forcing it, unless
#: ``shutdown_timeout`` says (the core's and the CLI's default too).
DEFAULT_SHUTDOWN_S = 30.0
#: ``shutdown_timeout`` is kept with the VM in the daemon, under this label (hidden from
#: ``labels``), so ``terraform import`` restores it instead of showing a diff.
SHUTDOWN_LABEL = "terraform.infrasim/shutdown-timeout"
DEFAULT_ARCH = "aarch64"
MACHINES = ("virt", "raspi3b")
ACCELERATORS = ("auto", "hvf", "kvm", "tcg")
SET_ATTRS = ("volumes", "networks", "port_forward")
#: Core field names → attribute names, for diagnostics from the core's validators.
RENAMES: dict[str, str] = {"volume_ids": "volumes", "network_ids": "networks",
                           "boot_disk_id": "boot_disk", "port_forwards": "port_forward",
                           "qos_profile_id": "qos_profile", "nic_qos": "network_qos"}
#: Map attributes: a key after the name is a map key, kept whole.
MAPS = ("labels", "extra_args", "network_qos")
#: Generous offline limit: the daemon's own host limit is checked at plan (see ``plan``).
_OFFLINE_MAX_MEMORY_MB = 1 << 30


SCHEMA = Schema(
    description="A QEMU virtual machine managed by the InfraSim daemon.",
    attrs=(
        Attr("id", "string", computed=True, stable=True, description="The VM's id."),
        Attr("name", "string", required=True, force_new=True,
             description="Unique name (1-63 of a-z, 0-9 and '-'). Changing it replaces the VM."),
        Attr("machine", "string", optional=True, computed=True, force_new=True, stable=True,
             description='"virt" (default; fast, PCI, networking) or "raspi3b" (faithful '
                         "Raspberry Pi 3B: 4 cores, 1024 MiB, needs dtb, TCG only)."),
        Attr("arch", "string", optional=True, computed=True, force_new=True, stable=True,
             description='Guest architecture: "aarch64" (default) or "x86_64".'),
        Attr("cpu_cores", "number", optional=True, computed=True, stable=True,
             description="vCPUs (default 1; 4 on raspi3b). Restarts a running VM."),
        Attr("memory_mb", "number", optional=True, computed=True, stable=True,
             description="Memory in MiB (default 256; 1024 on raspi3b). Restarts a running VM."),
        Attr("kernel", "string", optional=True,
             description="Absolute path of a kernel for direct kernel boot."),
        Attr("initrd", "string", optional=True, description="Absolute path of an initrd."),
        Attr("cmdline", "string", optional=True, description="Kernel command line."),
        Attr("dtb", "string", optional=True, description="Device tree (required by raspi3b)."),
        Attr("boot_disk", "string", optional=True,
             description="The volume to boot from (one of `volumes`)."),
        Attr("volumes", ["set", "string"], optional=True,
             description="Volumes to attach, by name (a set: order never matters)."),
        Attr("networks", ["set", "string"], optional=True,
             description="Networks to join, by name (a set)."),
        Attr("qos_profile", "string", optional=True,
             description="QoS profile (infrasim_qos_profile name) shaping every segment NIC "
                         "that network_qos does not name. Changes apply live, no restart."),
        Attr("network_qos", ["map", "string"], optional=True,
             description="Per-NIC QoS: segment network (as named in networks) -> QoS profile "
                         "name. Changes apply live, no restart."),
        Attr("accelerator", "string", optional=True, computed=True, stable=True,
             description='Requested accelerator: "auto" (default), "hvf", "kvm" or "tcg".'),
        Attr("compatibility_mode", "bool", optional=True, computed=True, stable=True,
             description="Most conservative virtual hardware for old guests (default false)."),
        Attr("extra_args", ["map", "string"], optional=True,
             description="Allow-listed QEMU tuning (e.g. cpu.model, tcg.tb_size)."),
        Attr("labels", ["map", "string"], optional=True, description="Labels."),
        Attr("running", "bool", optional=True, computed=True, stable=True,
             description="Desired power state (default true). A VM stopped outside terraform "
                         "shows as drift."),
        Attr("shutdown_timeout", "string", optional=True,
             description='How long a stop (restart, running = false, destroy) waits for the '
                         'guest to power off before forcing it (default "30s"); never longer '
                         "than the operation's timeout allows."),
        Attr("state", "string", computed=True,
             description="PENDING, RUNNING, STOPPED, PAUSED or ERROR."),
        Attr("pid", "number", computed=True, description="QEMU's pid (0 when not running)."),
        Attr("accelerator_used", "string", computed=True,
             description="The accelerator QEMU last ran with."),
        Attr("console_path", "string", computed=True,
             description="Unix socket of the serial console (on the daemon's host)."),
        Attr("serial_log", "string", computed=True,
             description="File with everything the serial console printed."),
        Attr("qemu_version", "string", computed=True, description="QEMU's version."),
    ),
    blocks=(
        Block("port_forward", nesting="set", description="Host port forwarded to the guest "
              "(user networking).", attrs=(
                  Attr("host_port", "number", required=True),
                  Attr("guest_port", "number", required=True),
                  Attr("protocol", "string", optional=True, computed=True, stable=True,
                       description='"tcp" (default) or "udp".'),
                  Attr("host_addr", "string", optional=True, computed=True, stable=True,
                       description='Host address to listen on (default "127.0.0.1").'),
              )),
        Block("timeouts", nesting="single", description='Operation timeouts ("30s", "5m", '
              '"1h"): create (create+start), update (incl. restart), delete (graceful stop '
              "then forced, then delete).", attrs=(
                  Attr("create", "string", optional=True),
                  Attr("update", "string", optional=True),
                  Attr("delete", "string", optional=True),
              )),
    ),
)


# -- pure mapping ---------------------------------------------------------------------------


def machine_defaults(machine: str) -> tuple[int, int]:
    """(cpu_cores, memory_mb) a machine gets when the config does not say (as the CLI)."""
    return (4, 1024) if machine == "raspi3b" else (1, 256)


def as_int(value: Any) -> int:
    """Terraform numbers arrive as int or float; a fractional one is refused."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise ValueError(f"{value!r} is not a whole number")
    return int(value)


def forward_attrs(fwd: Mapping[str, Any]) -> dict[str, Any]:
    """A port_forward element with its defaults filled in (unknowns kept)."""
    proto = fwd.get("protocol")
    addr = fwd.get("host_addr")
    return {"host_port": fwd.get("host_port"), "guest_port": fwd.get("guest_port"),
            "protocol": "tcp" if proto is None else proto,
            "host_addr": "127.0.0.1" if addr is None else addr}


def spec_from_attrs(attrs: Mapping[str, Any]) -> VMSpec:
    """A VMSpec from (known) attribute values; volumes, networks and QoS profiles stay as given
    (names)."""
    from ...core.model import Accelerator, Machine, PortForward, VMSpec

    machine = attrs.get("machine") or "virt"
    cpus, mem = machine_defaults(machine)
    return VMSpec(
        arch=attrs.get("arch") or DEFAULT_ARCH,
        machine=Machine(machine),
        cpu_cores=as_int(attrs["cpu_cores"]) if attrs.get("cpu_cores") is not None else cpus,
        memory_mb=as_int(attrs["memory_mb"]) if attrs.get("memory_mb") is not None else mem,
        volume_ids=sorted(attrs.get("volumes") or []),
        network_ids=sorted(attrs.get("networks") or []),
        qos_profile_id=attrs.get("qos_profile") or "",
        nic_qos=dict(attrs.get("network_qos") or {}),
        boot_disk_id=attrs.get("boot_disk") or "",
        kernel=attrs.get("kernel") or "",
        initrd=attrs.get("initrd") or "",
        cmdline=attrs.get("cmdline") or "",
        dtb=attrs.get("dtb") or "",
        port_forwards=[PortForward(as_int(f["host_port"]), as_int(f["guest_port"]),
                                   f["protocol"], f["host_addr"])
                       for f in (forward_attrs(p) for p in attrs.get("port_forward") or [])],
        accelerator=Accelerator(attrs.get("accelerator") or "auto"),
        compatibility_mode=bool(attrs.get("compatibility_mode")),
        extra_args=dict(attrs.get("extra_args") or {}),
    )


def _strings(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _ref(ref_id: str, names: Mapping[str, str], prior_refs: list[str]) -> str:
    """Show an attached volume/network as the configuration named it: its name, or its id if
    that is what the prior state (hence the config) used."""
    return ref_id if ref_id in prior_refs else names.get(ref_id, ref_id)


def state_from_vm(vm: VM, volume_names: Mapping[str, str], network_names: Mapping[str, str],
                  prior: Mapping[str, Any] | None,
                  qos_names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Attributes of ``vm`` as terraform state. ``prior`` (state or plan) decides only forms
    that cannot be told apart in the daemon: null versus empty, a name versus an id.
    ``qos_names`` maps QoS profile ids to names (ids are shown where it has none)."""
    p = dict(prior or {})
    qos = qos_names or {}
    spec, st = vm.spec, vm.status
    prior_vols = _strings(p.get("volumes"))
    prior_boot = _strings([p.get("boot_disk")])
    prior_nets = _strings(p.get("networks"))
    forwards = sorted(({"host_port": f.host_port, "guest_port": f.guest_port,
                        "protocol": f.protocol, "host_addr": f.host_addr}
                       for f in spec.port_forwards),
                      key=lambda f: (f["host_addr"], f["host_port"], f["protocol"]))
    from ...core.model import VMState

    return {
        "id": vm.meta.id,
        "name": vm.meta.name,
        "machine": spec.machine.value,
        "arch": spec.arch,
        "cpu_cores": spec.cpu_cores,
        "memory_mb": spec.memory_mb,
        "kernel": keep_empty(p.get("kernel"), spec.kernel),
        "initrd": keep_empty(p.get("initrd"), spec.initrd),
        "cmdline": keep_empty(p.get("cmdline"), spec.cmdline),
        "dtb": keep_empty(p.get("dtb"), spec.dtb),
        "boot_disk": (_ref(spec.boot_disk_id, volume_names, prior_boot + prior_vols)
                      if spec.boot_disk_id else keep_empty(p.get("boot_disk"), "")),
        "volumes": keep_empty(p.get("volumes"),
                              sorted(_ref(v, volume_names, prior_vols)
                                     for v in spec.volume_ids)),
        "networks": keep_empty(p.get("networks"),
                               sorted(_ref(n, network_names, prior_nets)
                                      for n in spec.network_ids)),
        "qos_profile": (_ref(spec.qos_profile_id, qos, _strings([p.get("qos_profile")]))
                        if spec.qos_profile_id else keep_empty(p.get("qos_profile"), "")),
        "network_qos": keep_empty(p.get("network_qos"),
                                  nic_qos_state(spec.nic_qos, network_names, qos,
                                                p.get("network_qos"))),
        "port_forward": forwards,
        "accelerator": spec.accelerator.value,
        "compatibility_mode": spec.compatibility_mode,
        "extra_args": keep_empty(p.get("extra_args"), dict(spec.extra_args)),
        "labels": keep_empty(p.get("labels"), {k: v for k, v in vm.meta.labels.items()
                                               if k != SHUTDOWN_LABEL}),
        "running": st.state in (VMState.RUNNING, VMState.PAUSED, VMState.PENDING),
        "shutdown_timeout": vm.meta.labels.get(SHUTDOWN_LABEL) or None,
        "timeouts": p.get("timeouts"),
        "state": st.state.value,
        "pid": st.pid,
        "accelerator_used": st.accelerator or None,
        "console_path": st.serial_socket or None,
        "serial_log": st.serial_log or None,
        "qemu_version": st.qemu_version or None,
    }


def nic_qos_state(nic_qos: Mapping[str, str], network_names: Mapping[str, str],
                  qos_names: Mapping[str, str], prior: Any) -> dict[str, str]:
    """network id -> profile id as the configuration named them (names, or ids where the
    prior used ids)."""
    prior_map = prior if isinstance(prior, dict) else {}
    prior_keys = [k for k in prior_map if isinstance(k, str)]
    prior_vals = _strings(list(prior_map.values()))
    return {_ref(net, network_names, prior_keys): _ref(prof, qos_names, prior_vals)
            for net, prof in nic_qos.items()}


def _norm(value: Any) -> Any:
    return None if value in ("", [], {}) else value


def restart_changes(prior: Mapping[str, Any], planned: Mapping[str, Any]) -> list[str]:
    """The restart-requiring attributes this plan changes (an unknown value may change)."""
    out = []
    for key in RESTART_REQUIRED:
        a, b = prior.get(key), planned.get(key)
        if key == "port_forward" and isinstance(b, list):
            b = [forward_attrs(f) if isinstance(f, dict) else f for f in b]
        if _norm(a) is None and _norm(b) is None:
            continue
        if not same(_norm(a), _norm(b), as_set=key in SET_ATTRS):
            out.append(key)
    return out


def restart_warnings(changes: list[str], prior_running: Any, planned_running: Any,
                     ) -> Diagnostics:
    """One warning saying when restart-requiring changes take effect."""
    diags = Diagnostics()
    if not changes:
        return diags
    names = ", ".join(changes)
    path = (changes[0],)
    if planned_running is False:
        diags.warning("Changes apply at the VM's next start",
                      f"{names} only take effect when QEMU starts; with running = false the "
                      "VM stays stopped and picks them up when it is next started.", path)
    elif prior_running is True:
        when = "" if planned_running is True else " (if it is running then)"
        diags.warning("The VM will be restarted",
                      f"Changing {names} needs a restart: apply stops the VM{when} (a graceful "
                      "power-off, forced after shutdown_timeout) and starts it again.", path)
    return diags


def plan_values(prior: Mapping[str, Any] | None, config: Mapping[str, Any],
                planned: dict[str, Any]) -> dict[str, Any]:
    """Fill in what terraform cannot: defaults of optional+computed attributes on create, the
    prior's on update, ``running`` defaulting to true, port forward defaults; runtime
    attributes unknown when QEMU will start or stop."""
    machine = opt(config, prior, "machine", "virt")
    cpus, mem = machine_defaults(machine) if isinstance(machine, str) else (UNKNOWN, UNKNOWN)
    planned["machine"] = machine
    planned["arch"] = opt(config, prior, "arch", DEFAULT_ARCH)
    planned["cpu_cores"] = opt(config, prior, "cpu_cores", cpus)
    planned["memory_mb"] = opt(config, prior, "memory_mb", mem)
    planned["accelerator"] = opt(config, prior, "accelerator", "auto")
    planned["compatibility_mode"] = opt(config, prior, "compatibility_mode", False)
    running = config.get("running")
    planned["running"] = True if running is None else running
    forwards = config.get("port_forward")
    if isinstance(forwards, list):
        planned["port_forward"] = [forward_attrs(f) if isinstance(f, dict) else f
                                   for f in forwards]
    for key in ("kernel", "initrd", "cmdline", "dtb", "boot_disk", "volumes", "networks",
                "extra_args", "labels", "shutdown_timeout", "timeouts", *LIVE):
        planned[key] = config.get(key)
    if prior is None:
        planned["id"] = UNKNOWN
        unknown_all(planned, RUNTIME)
        return planned
    planned["id"] = prior.get("id")
    changes = restart_changes(prior, planned)
    power = not same(prior.get("running"), planned["running"])
    if power or (changes and planned["running"] is not False):
        unknown_all(planned, RUNTIME)
    else:
        for key in RUNTIME:
            planned[key] = prior.get(key)
    return planned


# -- validation -----------------------------------------------------------------------------


def validate_config(config: Mapping[str, Any]) -> Diagnostics:
    """Plan-time checks with attribute paths: the core's own validators on the known part of
    the config (unknown values are skipped; file existence and host limits are the daemon's
    to judge, at plan)."""

    diags = timeout_diags(config.get("timeouts"), DEFAULT_TIMEOUTS)
    diags.extend(timeout_diags({"shutdown_timeout": config.get("shutdown_timeout")},
                               ("shutdown_timeout",), ()))
    name_and_label_diags(diags, config, "VM")
    labels = config.get("labels")
    if isinstance(labels, dict) and SHUTDOWN_LABEL in labels:
        diags.error("Reserved label", f"{SHUTDOWN_LABEL} holds shutdown_timeout; set that "
                    "instead", ("labels", SHUTDOWN_LABEL))
    diags.extend(network_qos_diags(config.get("network_qos"), config.get("networks")))
    known = known_view(config, diags)
    forwards, index = _known_forwards(config.get("port_forward"), diags)
    known["port_forward"] = forwards
    reported = {d.path for d in diags.items}
    for field, reason in _core_errors(known):
        path = _path(field, index)
        if path and isinstance(path[0], str) and (not wholly_known(config.get(path[0]))
                                                  or path[0] in _stand_ins(config)):
            continue
        if path and path in reported:  # said already, in terraform's terms
            continue
        diags.error("Invalid VM configuration", reason, path)
    return diags


def network_qos_diags(network_qos: Any, networks: Any) -> Diagnostics:
    """Each network_qos key must be one of the VM's networks, spelled as there (skipped while
    either is unknown)."""
    diags = Diagnostics()
    if not isinstance(network_qos, dict) or not wholly_known(networks):
        return diags
    joined = set(_strings(networks))
    for key in network_qos:
        if key not in joined:
            diags.error("Invalid network_qos", f"{key!r} is not one of the VM's networks "
                        f"({', '.join(sorted(joined)) or 'none'}): add it to networks, or "
                        "spell it as networks does", ("network_qos", key))
    return diags


#: Stand-ins for values not known until apply: each passes the checks it is involved in, so
#: only known values can produce an error.
_PLACEHOLDER_PATH = "/value-known-after-apply"
_PLACEHOLDER_REF = "value-known-after-apply"


def _stand_ins(config: Mapping[str, Any]) -> set[str]:
    """Attributes whose validated value includes a stand-in (never blamed for an error)."""
    return {"volumes"} if not wholly_known(config.get("boot_disk")) else set()


def known_view(config: Mapping[str, Any], diags: Diagnostics) -> dict[str, Any]:
    """The config with unknown (or ill-typed, reported to ``diags``) values replaced by
    stand-ins that pass validation."""
    known = {k: v for k, v in config.items() if wholly_known(v)}
    for key, allowed in (("machine", MACHINES), ("accelerator", ACCELERATORS)):
        value = known.get(key)
        if value is not None and value not in allowed:
            diags.error(f"Invalid {key}", f"{value!r}: use one of {', '.join(allowed)}", (key,))
            known[key] = None
    for key in ("cpu_cores", "memory_mb"):
        if known.get(key) is not None:
            try:
                as_int(known[key])
            except ValueError as exc:
                diags.error(f"Invalid {key}", str(exc), (key,))
                known[key] = None
    for key in ("kernel", "initrd", "dtb"):
        if key not in known:
            known[key] = _PLACEHOLDER_PATH
    if "boot_disk" not in known:  # whatever it becomes, it will be one of the volumes
        known["boot_disk"] = _PLACEHOLDER_REF
        known["volumes"] = [*(known.get("volumes") or []), _PLACEHOLDER_REF]
    if "volumes" not in known:
        boot = known.get("boot_disk")
        known["volumes"] = [boot] if boot else []
    extra = config.get("extra_args")
    if isinstance(extra, dict):
        known["extra_args"] = {k: v for k, v in extra.items() if wholly_known(v)}
    nic_qos = config.get("network_qos")
    if isinstance(nic_qos, dict):  # its keys are judged against networks: known ones only
        known["network_qos"] = ({k: v for k, v in nic_qos.items() if wholly_known(v)}
                                if wholly_known(config.get("networks")) else {})
    return known


def _known_forwards(value: Any, diags: Diagnostics) -> tuple[list[dict[str, Any]], list[int]]:
    """The wholly known, well-typed port forwards and their indexes in the config."""
    out: list[dict[str, Any]] = []
    index: list[int] = []
    if not isinstance(value, list):
        return out, index
    for i, fwd in enumerate(value):
        if not isinstance(fwd, dict) or not wholly_known(fwd):
            continue
        ok = True
        for key in ("host_port", "guest_port"):
            try:
                as_int(fwd.get(key))
            except ValueError as exc:
                diags.error("Invalid port", str(exc), ("port_forward", i, key))
                ok = False
        if ok:
            out.append(forward_attrs(fwd))
            index.append(i)
    return out, index


def _path(field: str, forward_index: list[int]) -> tuple[str | int, ...]:
    """The attribute path of a core field, with port forward indexes back in config order."""
    path = path_of(field, RENAMES, maps=MAPS)
    if len(path) >= 2 and path[0] == "port_forward" and isinstance(path[1], int):
        i = path[1]
        path = ("port_forward", forward_index[i] if i < len(forward_index) else i, *path[2:])
    return path


def _core_errors(known: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every error the core's spec validator finds, not just the first: after each one the
    offending field is reset to a neutral value and the check runs again."""
    from ...core.errors import InvalidSpec
    from ...core.validation import Limits, World, validate_vm_spec

    spec = spec_from_attrs(known)
    refs = [*spec.volume_ids, spec.boot_disk_id]
    profiles = [spec.qos_profile_id, *spec.nic_qos.values()]
    world = World(volumes={r: r for r in refs if r}, networks={n: n for n in spec.network_ids},
                  qos_profiles={q: q for q in profiles if q})
    limits = Limits(max_memory_mb=_OFFLINE_MAX_MEMORY_MB)
    errors: list[tuple[str, str]] = []
    seen: set[str] = set()
    for _ in range(16):
        try:
            validate_vm_spec(spec, limits=limits, world=world, host_os="any",
                             check_file=_absolute_only)
            break
        except InvalidSpec as exc:
            top = exc.field.split("[")[0].split(".")[0]
            if top in seen or not _neutralise(spec, top):
                if top not in seen:
                    errors.append((exc.field, exc.reason))
                break
            seen.add(top)
            if not (top == "accelerator" and "macOS" in exc.reason):  # the daemon's host decides
                errors.append((exc.field, exc.reason))
    return errors


def _absolute_only(field: str, path: str) -> None:
    """Offline file check: the files live on the daemon's host, which checks them at plan."""
    from ...core.errors import InvalidSpec

    if not os.path.isabs(path):
        raise InvalidSpec(field, f"{path!r} must be an absolute path (e.g. abspath(...))")


def _neutralise(spec: VMSpec, top: str) -> bool:
    """Reset one field to a value that passes, so validation can go on to the next field."""
    from ...core.model import Accelerator, Machine

    raspi = spec.machine == Machine.RASPI3B
    resets: dict[str, Any] = {
        "arch": DEFAULT_ARCH, "machine": Machine.VIRT, "cpu_cores": 4 if raspi else 1,
        "memory_mb": 1024 if raspi else 256, "kernel": "/kernel", "initrd": "", "cmdline": "",
        "dtb": "/dtb", "port_forwards": [], "network_ids": [], "extra_args": {},
        "accelerator": Accelerator.AUTO, "qos_profile_id": "", "nic_qos": {},
    }
    if top == "volume_ids":  # keep the VM bootable, or the kernel check would follow
        spec.volume_ids, spec.boot_disk_id = [], ""
        spec.kernel = spec.kernel or "/kernel"
        return True
    if top == "boot_disk_id":  # as if it were listed, so no kernel error follows
        spec.volume_ids = [*spec.volume_ids, spec.boot_disk_id]
        return True
    if top not in resets:
        return False
    if top == "network_ids":  # per-NIC QoS names networks: it goes with them
        spec.nic_qos = {}
    setattr(spec, top, resets[top])
    return True


# -- the resource ---------------------------------------------------------------------------


class VMResource(Resource):
    type_name = "infrasim_vm"
    schema = SCHEMA
    field_paths = {k: (v,) for k, v in RENAMES.items()}

    def validate(self, config: dict[str, Any]) -> Diagnostics:
        return validate_config(config)

    async def plan(self, ctx: Context, prior: dict[str, Any] | None, proposed: dict[str, Any],
                   config: dict[str, Any], default: PlanResult) -> PlanResult:
        if default.planned is None:
            return default
        planned = plan_values(prior, config, dict(default.planned))
        diags = default.diags
        changes = restart_changes(prior, planned) if prior is not None else []
        if prior is not None:
            diags.extend(restart_warnings(changes, prior.get("running"), planned["running"]))
        if prior is None:
            note_planned("vm", planned.get("name"))
        if prior is None or changes:
            diags.extend(await self._daemon_check(ctx, planned))
        elif any(not same(_norm(prior.get(k)), _norm(planned.get(k))) for k in LIVE):
            diags.extend(await self._qos_check(ctx, planned))
        return PlanResult(planned, replace_paths(SCHEMA, prior, planned), diags,
                          default.private)

    async def _qos_check(self, ctx: Context, planned: Mapping[str, Any]) -> Diagnostics:
        """QoS profiles that exist neither in the daemon nor in this plan (best effort)."""
        if not all(wholly_known(planned.get(k)) for k in LIVE):
            return Diagnostics()
        spec = spec_from_attrs(planned)
        if not spec.qos_profile_id and not spec.nic_qos:
            return Diagnostics()
        try:
            core = await ctx.core()
            return missing_qos(spec, await _names(core, "qos_profiles"))
        except Exception:
            return Diagnostics()

    async def _daemon_check(self, ctx: Context, planned: Mapping[str, Any]) -> Diagnostics:
        """The daemon's own validation (files on its host, its memory, accelerators, the QEMU
        command line), best effort: a volume or network that exists neither in the daemon nor
        in this plan is an error; those this apply creates are left out of the check; an
        unreachable daemon is apply's problem."""
        from ...core.errors import InvalidSpec

        diags = Diagnostics()
        keys = ("name", "machine", "arch", "cpu_cores", "memory_mb", "kernel", "initrd",
                "cmdline", "dtb", "boot_disk", "volumes", "networks", "port_forward",
                "accelerator", "compatibility_mode", "extra_args", "labels", *LIVE)
        if not all(wholly_known(planned.get(k)) for k in keys):
            return diags
        try:
            core = await ctx.core()
            spec = spec_from_attrs(planned)
            vols = await _names(core, "volumes") if spec.volume_ids or spec.boot_disk_id else {}
            nets = await _names(core, "networks") if spec.network_ids else {}
            qos = (await _names(core, "qos_profiles")
                   if spec.qos_profile_id or spec.nic_qos else {})
            diags.extend(missing_refs(spec, vols, nets))
            diags.extend(missing_qos(spec, qos))
            if diags.has_errors:
                return diags
            spec.volume_ids = [vols[v] for v in spec.volume_ids if v in vols]
            spec.boot_disk_id = vols.get(spec.boot_disk_id, "")
            spec.network_ids = [nets[n] for n in spec.network_ids if n in nets]
            # profiles this apply creates are left out of the check, as volumes are
            spec.qos_profile_id = qos.get(spec.qos_profile_id, "")
            spec.nic_qos = {nets[n]: qos[q] for n, q in spec.nic_qos.items()
                            if n in nets and q in qos}
            if not spec.kernel and not spec.boot_disk_id:
                return diags  # the boot disk is created by this apply
            await ctx.wait(core.validate(planned["name"], spec, daemon_labels(planned)),
                           timeout=15)
        except InvalidSpec as exc:
            add_error(diags, "Invalid VM configuration", exc, RENAMES)
        except Exception:
            pass
        return diags

    # -- apply ------------------------------------------------------------------------------

    async def apply(self, ctx: Context, prior: dict[str, Any] | None,
                    planned: dict[str, Any] | None, config: dict[str, Any] | None) -> ApplyResult:
        if planned is None:
            assert prior is not None
            return await self._delete(ctx, prior)
        if prior is None:
            return await self._create(ctx, planned)
        return await self._update(ctx, prior, planned)

    async def _create(self, ctx: Context, planned: dict[str, Any]) -> ApplyResult:
        from ...core.errors import AlreadyExists, InfraSimError

        diags = Diagnostics()
        budget = timeouts_of(planned, DEFAULT_TIMEOUTS)["create"]
        deadline = deadline_in(budget)
        core = await ctx.core()
        spec = spec_from_attrs(planned)
        try:
            vols, nets, qos = await _resolve(core, spec)
        except InfraSimError as exc:
            return ApplyResult(None, add_error(diags, "Cannot create the VM", exc, RENAMES))
        name = planned["name"]
        try:
            vm = await guarded(ctx, core.create_vm(name, spec, daemon_labels(planned)),
                               remaining(deadline))
        except AlreadyExists as exc:
            hint = (f"Import it to manage it here: terraform import <address> {name}")
            return ApplyResult(None, add_error(diags, "A VM with this name exists", exc,
                                               path=("name",), hint=hint))
        except InfraSimError as exc:
            return ApplyResult(None, add_error(diags, "Cannot create the VM", exc, RENAMES))
        except (Cancelled, TimeoutError) as exc:
            return await self._abandoned(core, name, planned, vols, nets, diags, exc, "create",
                                         qos)
        if planned.get("running") is not False:
            try:
                vm = await guarded(ctx, core.start_vm(vm.meta.id), remaining(deadline))
            except InfraSimError as exc:
                add_error(diags, f"VM {name} was created but did not start", exc, RENAMES,
                          hint="The VM is kept (stopped) and tainted: the next apply "
                               "replaces it. `infrasim vm get` and its serial log say more.")
                return ApplyResult(await _state_or(core, vm, vols, nets, planned, qos=qos),
                                   diags)
            except (Cancelled, TimeoutError) as exc:
                return await self._abandoned(core, vm.meta.id, planned, vols, nets, diags, exc,
                                             "start", qos)
        return ApplyResult(state_from_vm(vm, vols, nets, planned, qos), diags)

    async def _abandoned(self, core: Any, ref: str, planned: dict[str, Any],
                         vols: Mapping[str, str], nets: Mapping[str, str], diags: Diagnostics,
                         exc: BaseException, what: str,
                         qos: Mapping[str, str] | None = None) -> ApplyResult:
        """StopProvider or the create timeout: the operation has settled; make sure no QEMU is
        left running, and hand back what exists (tainted) so nothing is orphaned."""
        from ...core.errors import InfraSimError, NotFound

        reason = ("terraform asked the provider to stop" if isinstance(exc, Cancelled)
                  else "the create timeout passed")
        try:
            vm = await core.get_vm(ref)
        except NotFound:
            vm = None
        except InfraSimError:
            vm = None
        if vm is not None and vm.status.state.value in ("RUNNING", "PAUSED", "PENDING"):
            with contextlib.suppress(InfraSimError, TimeoutError):
                vm = await asyncio.wait_for(core.stop_vm(vm.meta.id, force=True),
                                            FORCE_RESERVE_S)
        summary = "Cancelled" if isinstance(exc, Cancelled) else "Timed out"
        detail = (f"The {what} was interrupted: {reason}. "
                  + ("The VM exists, stopped, and is tainted: the next apply replaces it."
                     if vm is not None else "No VM was created."))
        diags.error(summary, detail)
        state = state_from_vm(vm, vols, nets, planned, qos) if vm is not None else None
        return ApplyResult(state, diags)

    async def _update(self, ctx: Context, prior: dict[str, Any],
                      planned: dict[str, Any]) -> ApplyResult:
        from ...core.errors import Conflict, InfraSimError

        diags = Diagnostics()
        budget = timeouts_of(planned, DEFAULT_TIMEOUTS)["update"]
        deadline = deadline_in(budget)
        core = await ctx.core()
        vm_id = prior["id"]
        vols: Mapping[str, str] = {}
        nets: Mapping[str, str] = {}
        qos: Mapping[str, str] = {}
        vm = None
        try:
            vm = await core.get_vm(vm_id)
            spec = spec_from_attrs(planned)
            vols, nets, qos = await _resolve(core, spec)
            before = vm.spec
            spec.enable_tpm = before.enable_tpm
            _keep_order(spec, before)
            # QoS is applied live by the daemon: only the rest of the spec needs a restart
            restart = _restart_part(spec) != _restart_part(before)
            labels = daemon_labels(planned)
            if spec != before or labels != vm.meta.labels:
                for attempt in (1, 2):
                    vm.spec, vm.meta.labels = spec, labels
                    try:
                        vm = await core.update_vm(vm, vm.meta.version)
                        break
                    except Conflict:
                        if attempt == 2:
                            raise
                        vm = await core.get_vm(vm_id)
            live = vm.status.state.value in ("RUNNING", "PAUSED", "PENDING")
            want = planned.get("running") is not False
            if live and (not want or restart):
                await _stop(ctx, core, vm_id, remaining(deadline), shutdown_of(planned))
            if want and (not live or restart):
                await guarded(ctx, core.start_vm(vm_id), remaining(deadline))
            vm = await core.get_vm(vm_id)
        except (InfraSimError, Cancelled, TimeoutError) as exc:
            add_error(diags, f"Cannot update VM {planned.get('name')}", exc, RENAMES,
                      hint=_interrupted(exc, "update"))
            state = (await _state_or(core, vm, vols, nets, planned, qos=qos) if vm is not None
                     else prior)
            return ApplyResult(state, diags)
        state = state_from_vm(vm, vols, nets, planned, qos)
        return ApplyResult(settle(planned, state, RUNTIME), diags)

    async def _delete(self, ctx: Context, prior: dict[str, Any]) -> ApplyResult:
        from ...core.errors import InfraSimError, NotFound

        diags = Diagnostics()
        budget = timeouts_of(prior, DEFAULT_TIMEOUTS)["delete"]
        deadline = deadline_in(budget)
        core = await ctx.core()
        try:
            vm = await core.get_vm(prior["id"])
        except NotFound:
            return ApplyResult(None, diags)
        try:
            if vm.status.state.value in ("RUNNING", "PAUSED", "PENDING"):
                await _stop(ctx, core, vm.meta.id, remaining(deadline), shutdown_of(prior))
            await ctx.wait(core.delete_vm(vm.meta.id, force=True), remaining(deadline))
        except NotFound:
            return ApplyResult(None, diags)
        except (InfraSimError, Cancelled, TimeoutError) as exc:
            add_error(diags, f"Cannot delete VM {vm.meta.name}", exc,
                      hint=_interrupted(exc, "delete"))
            return ApplyResult(await _state_or(core, vm, {}, {}, prior, names=True), diags)
        return ApplyResult(None, diags)

    # -- refresh and import -----------------------------------------------------------------

    async def read(self, ctx: Context, state: dict[str, Any]) -> dict[str, Any] | None:
        from ...core.errors import NotFound

        core = await ctx.core()
        try:
            vm = await core.get_vm(state.get("id") or state["name"])
        except NotFound:
            return None
        vols = await _id_names(core, "volumes") if vm.spec.volume_ids else {}
        nets = await _id_names(core, "networks") if vm.spec.network_ids else {}
        qos = await _qos_id_names(core, vm.spec)
        return state_from_vm(vm, vols, nets, state, qos)

    async def import_state(self, ctx: Context, id: str) -> dict[str, Any] | None:
        """``terraform import infrasim_vm.web web`` (a name) or the VM's id."""
        return await self.read(ctx, {**null_object(SCHEMA), "id": id})


def _interrupted(exc: BaseException, op: str) -> str:
    if isinstance(exc, TimeoutError):
        return (f"The {op} timeout passed (see the timeouts block); the VM keeps the state "
                "shown.")
    if isinstance(exc, Cancelled):
        return "Interrupted (Ctrl-C); the VM keeps the state shown."
    return ""


def missing_refs(spec: VMSpec, volumes: Mapping[str, str], networks: Mapping[str, str],
                 ) -> Diagnostics:
    """Volumes and networks (by name or id) that exist neither in the daemon nor in this
    plan: pointed at their attribute before anything is created."""
    diags = Diagnostics()
    hint = ("; create it (an infrasim_{0} referenced here, so terraform creates it first) or "
            "with `infrasim {0} create`")
    lost = [v for v in spec.volume_ids if v not in volumes and not is_planned("volume", v)]
    if lost:
        diags.error("No such volume", f"no volume {', '.join(map(repr, lost))}"
                    + hint.format("volume"), ("volumes",))
    boot = spec.boot_disk_id
    if (boot and boot not in spec.volume_ids and boot not in volumes
            and not is_planned("volume", boot)):
        diags.error("No such volume", f"no volume {boot!r}" + hint.format("volume"),
                    ("boot_disk",))
    lost = [n for n in spec.network_ids if n not in networks and not is_planned("network", n)]
    if lost:
        diags.error("No such network", f"no network {', '.join(map(repr, lost))}"
                    + hint.format("network"), ("networks",))
    return diags


def missing_qos(spec: VMSpec, profiles: Mapping[str, str]) -> Diagnostics:
    """QoS profiles (by name or id) that exist neither in the daemon nor in this plan."""
    diags = Diagnostics()
    hint = ("; create it (an infrasim_qos_profile referenced here, so terraform creates it "
            "first) or with `infrasim qos create`")

    def lost(ref: str) -> bool:
        return bool(ref) and ref not in profiles and not is_planned("qos_profile", ref)

    if lost(spec.qos_profile_id):
        diags.error("No such QoS profile", f"no QoS profile {spec.qos_profile_id!r}" + hint,
                    ("qos_profile",))
    for net, ref in sorted(spec.nic_qos.items()):
        if lost(ref):
            diags.error("No such QoS profile", f"no QoS profile {ref!r}" + hint,
                        ("network_qos", net))
    return diags


# -- daemon helpers -------------------------------------------------------------------------


async def _list(core: Any, kind: str) -> list[Any]:
    if kind == "volumes":
        return list(await core.list_volumes())
    if kind == "qos_profiles":
        return list(await core.list_qos_profiles())
    return list(await core.list_networks())


async def _names(core: Any, kind: str) -> dict[str, str]:
    """Name → id, and id → id (a reference may use either)."""
    items = await _list(core, kind)
    out = {i.meta.id: i.meta.id for i in items}
    out.update({i.meta.name: i.meta.id for i in items})
    return out


async def _id_names(core: Any, kind: str) -> dict[str, str]:
    return {i.meta.id: i.meta.name for i in await _list(core, kind)}


async def _qos_id_names(core: Any, spec: VMSpec) -> dict[str, str]:
    """Profile id → name, listed only when the VM names a profile."""
    if not spec.qos_profile_id and not spec.nic_qos:
        return {}
    return await _id_names(core, "qos_profiles")


def _restart_part(spec: VMSpec) -> VMSpec:
    """The spec without what the daemon applies live (QoS): a change here needs a restart."""
    return dataclasses.replace(spec, qos_profile_id="", nic_qos={})


async def _resolve(core: Any, spec: VMSpec,
                   ) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """Replace volume/network/QoS profile names in ``spec`` by ids (one list call per kind);
    returns id → name maps for the state. An unknown name is an InvalidSpec naming the
    attribute."""
    from ...core.errors import InvalidSpec

    vols: dict[str, str] = {}
    nets: dict[str, str] = {}
    qos: dict[str, str] = {}
    if spec.volume_ids or spec.boot_disk_id:
        by_ref = await _names(core, "volumes")
        vols = await _id_names(core, "volumes")
        for ref in [*spec.volume_ids, spec.boot_disk_id]:
            if ref and ref not in by_ref:
                field = "boot_disk_id" if ref == spec.boot_disk_id else "volume_ids"
                raise InvalidSpec(field, f"no volume {ref!r} (create it with infrasim_volume, "
                                  "or `infrasim volume create`)")
        spec.volume_ids = sorted(by_ref[v] for v in spec.volume_ids)
        spec.boot_disk_id = by_ref.get(spec.boot_disk_id, "")
    if spec.network_ids:
        by_ref = await _names(core, "networks")
        nets = await _id_names(core, "networks")
        for ref in spec.network_ids:
            if ref not in by_ref:
                raise InvalidSpec("network_ids", f"no network {ref!r}")
        for ref in spec.nic_qos:
            if ref not in by_ref:
                raise InvalidSpec(f"nic_qos.{ref}", f"no network {ref!r}")
        spec.nic_qos = {by_ref[n]: p for n, p in spec.nic_qos.items()}
        spec.network_ids = sorted(by_ref[n] for n in spec.network_ids)
    if spec.qos_profile_id or spec.nic_qos:
        by_ref = await _names(core, "qos_profiles")
        qos = await _id_names(core, "qos_profiles")
        if spec.qos_profile_id and spec.qos_profile_id not in by_ref:
            raise InvalidSpec("qos_profile_id", f"no QoS profile {spec.qos_profile_id!r} "
                              "(create it with infrasim_qos_profile, or `infrasim qos create`)")
        for net, ref in spec.nic_qos.items():
            if ref not in by_ref:
                raise InvalidSpec(f"nic_qos.{qos_key(net, nets)}", f"no QoS profile {ref!r}")
        spec.qos_profile_id = by_ref.get(spec.qos_profile_id, "")
        spec.nic_qos = {net: by_ref[ref] for net, ref in spec.nic_qos.items()}
    return vols, nets, qos


def qos_key(net_id: str, nets: Mapping[str, str]) -> str:
    """The network_qos key of a resolved network id (its name, for the diagnostic path)."""
    return nets.get(net_id, net_id)


def _keep_order(spec: VMSpec, before: VMSpec) -> None:
    """Sets in terraform, lists in the daemon: the same members in another order are no change
    (and must not restart the VM)."""
    if sorted(spec.volume_ids) == sorted(before.volume_ids):
        spec.volume_ids = list(before.volume_ids)
    if sorted(spec.network_ids) == sorted(before.network_ids):
        spec.network_ids = list(before.network_ids)
    if sorted(map(str, spec.port_forwards)) == sorted(map(str, before.port_forwards)):
        spec.port_forwards = list(before.port_forwards)


def daemon_labels(attrs: Mapping[str, Any]) -> dict[str, str]:
    """The VM's labels in the daemon: the configured ones plus ``shutdown_timeout``."""
    labels = dict(attrs.get("labels") or {})
    if isinstance(attrs.get("shutdown_timeout"), str):
        labels[SHUTDOWN_LABEL] = attrs["shutdown_timeout"]
    return labels


def shutdown_of(state: Mapping[str, Any]) -> float:
    """The graceful power-off window (``shutdown_timeout``, validated at plan)."""
    value = state.get("shutdown_timeout")
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError:
            pass
    return DEFAULT_SHUTDOWN_S


async def _stop(ctx: Context, core: Any, vm_id: str, budget: float, shutdown: float) -> None:
    """Graceful power-off for ``shutdown`` seconds (within most of the operation's
    ``budget``); the daemon forces it after that."""
    from ...core.errors import WrongState

    grace = min(shutdown, grace_seconds(budget))
    try:
        await ctx.wait(core.stop_vm(vm_id, timeout=grace), timeout=grace + FORCE_RESERVE_S)
    except TimeoutError:
        await ctx.wait(core.stop_vm(vm_id, force=True), timeout=FORCE_RESERVE_S)
    except WrongState:
        pass  # it stopped meanwhile


async def _state_or(core: Any, vm: VM, vols: Mapping[str, str], nets: Mapping[str, str],
                    prior: Mapping[str, Any], names: bool = False,
                    qos: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The VM's current state after a failure (falling back to what we last saw)."""
    from ...core.errors import InfraSimError

    try:
        vm = await core.get_vm(vm.meta.id)
        if names:
            vols = await _id_names(core, "volumes") if vm.spec.volume_ids else {}
            nets = await _id_names(core, "networks") if vm.spec.network_ids else {}
            qos = await _qos_id_names(core, vm.spec)
    except InfraSimError:
        pass
    return state_from_vm(vm, vols, nets, prior, qos)


__all__ = ["DEFAULT_TIMEOUTS", "FORCES_REPLACEMENT", "RESTART_REQUIRED", "RUNTIME", "SCHEMA",
           "UPDATES_IN_PLACE", "VMResource", "machine_defaults", "missing_qos", "missing_refs",
           "nic_qos_state", "plan_values",
           "restart_changes", "restart_warnings", "shutdown_of", "spec_from_attrs",
           "state_from_vm", "validate_config"]
