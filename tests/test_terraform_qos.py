"""``infrasim_qos_profile`` and the NIC QoS of ``infrasim_vm``.

Pure mapping, validation and planning first (no daemon); then the VM update path against a
recording stand-in core (a QoS change must never stop or start QEMU); then the real `terraform`
binary against one reattached provider process and a real daemon: create with a lora block,
a clean plan, in-place updates, errors at plan naming the attribute's line, import by name,
a refused delete, destroy; last, examples/terraform/qos with two running guests reshaped live.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infrasim_tui.core.errors import InvalidSpec
from infrasim_tui.core.guest import GuestKit
from infrasim_tui.core.model import (
    VM,
    LoraSpec,
    QosProfile,
    QosProfileSpec,
    QosProfileStatus,
    ResourceMeta,
    VMSpec,
    VMState,
    VMStatus,
)
from infrasim_tui.terraform.framework import UNKNOWN, Context, Diagnostics, is_unknown
from infrasim_tui.terraform.provider import default_plan
from infrasim_tui.terraform.resources import RESOURCES, common, qos_profile, vm

from .conftest import INFRASIM, infrasim

QOS = qos_profile.QosProfileResource()
VM_RES = vm.VMResource()
PROVIDER = str(Path(INFRASIM).with_name("terraform-provider-infrasim"))
TF_BASE = {"TF_IN_AUTOMATION": "1", "CHECKPOINT_DISABLE": "1", "TF_INPUT": "0"}


# -- helpers --------------------------------------------------------------------------------


def cfg(res: Any, **values: Any) -> dict[str, Any]:
    from infrasim_tui.terraform.framework import null_object

    return {**null_object(res.schema), **values}


def proposed_of(res: Any, prior: dict[str, Any] | None,
                config: dict[str, Any]) -> dict[str, Any]:
    """Terraform's proposed new state: the config, the prior's computed values where the
    config is null (nested block attributes too)."""
    out = dict(config)
    for a in res.schema.attrs:
        if a.computed and config.get(a.name) is None:
            out[a.name] = prior.get(a.name) if prior else None
    lora, old = config.get("lora"), (prior or {}).get("lora")
    if isinstance(lora, dict):
        out["lora"] = {k: (old.get(k) if v is None and isinstance(old, dict) else v)
                       for k, v in lora.items()}
    return out


def no_core_ctx() -> Context:
    async def nope() -> Any:
        raise ConnectionError("no daemon in this test")

    return Context(nope, asyncio.Event())


async def plan(res: Any, prior: dict[str, Any] | None, config: dict[str, Any],
               ctx: Context | None = None) -> Any:
    proposed = proposed_of(res, prior, config)
    return await res.plan(ctx or no_core_ctx(), prior, proposed, config,
                          default_plan(res.schema, prior, proposed, config))


def paths(diags: Diagnostics, severity: str = "error") -> list[tuple[str | int, ...]]:
    return [d.path for d in diags.items if d.severity == severity]


def lora_cfg(**values: Any) -> dict[str, Any]:
    return {**{k: None for k in qos_profile.LORA_ATTRS}, **values}


# -- pure: the schema mirrors the model -----------------------------------------------------


def test_schema_mirrors_the_model_and_its_defaults() -> None:
    spec_fields = [f.name for f in dataclasses.fields(QosProfileSpec) if f.name != "lora"]
    assert sorted(qos_profile.SPEC_ATTRS) == sorted(spec_fields)
    assert sorted(qos_profile.LORA_ATTRS) == sorted(f.name for f in dataclasses.fields(LoraSpec))
    lora = qos_profile.SCHEMA.block("lora")
    assert lora is not None and lora.nesting == "single"
    assert [a.name for a in lora.attrs] == list(qos_profile.LORA_ATTRS)
    assert set(qos_profile.FORCES_REPLACEMENT) == {a.name for a in qos_profile.SCHEMA.attrs
                                                   if a.force_new} == {"name", "labels"}
    assert not set(qos_profile.FORCES_REPLACEMENT) & set(qos_profile.UPDATES_IN_PLACE)
    assert "infrasim_qos_profile" in {r.type_name for r in RESOURCES}
    # Every "(default X)" in a description is the model's default.
    defaults = {**qos_profile.spec_defaults(), **qos_profile.lora_defaults()}
    attrs = [*qos_profile.SCHEMA.attrs, *lora.attrs]
    checked = 0
    for a in attrs:
        m = re.search(r"\(default ([^):;]+)", a.description)
        if m is None or a.name not in defaults:
            continue
        text = m.group(1).strip().strip('"')
        want = defaults[a.name]
        got: Any = (text == "true" if isinstance(want, bool) else
                    text if isinstance(want, str) else float(text))
        assert got == want, (a.name, text, want)
        checked += 1
    assert checked >= 25
    # The VM's QoS attributes change in place, never with a restart.
    assert set(vm.LIVE) <= set(vm.UPDATES_IN_PLACE)
    assert not set(vm.LIVE) & set(vm.RESTART_REQUIRED)


# -- pure: validation -----------------------------------------------------------------------


def test_validate_points_at_attributes() -> None:
    good = cfg(QOS, name="lossy", rate_bps=8_000_000, delay_ms=40, jitter_ms=5, loss_pct=0.1,
               lora=lora_cfg(spreading_factor=9, distance_m=1500.5))
    assert not QOS.validate(good).items
    assert paths(QOS.validate({**good, "distribution": "gaussian"})) == [("distribution",)]
    assert paths(QOS.validate({**good, "loss_pct": 150})) == [("loss_pct",)]
    assert paths(QOS.validate({**good, "rate_bps": 1.5})) == [("rate_bps",)]
    assert paths(QOS.validate({**good, "name": "Lossy_1"})) == [("name",)]
    assert paths(QOS.validate({**good, "labels": {"bad key": "x"}})) == [("labels", "bad key")]
    bad_sf = {**good, "lora": lora_cfg(spreading_factor=13)}
    assert paths(QOS.validate(bad_sf)) == [("lora", "spreading_factor")]
    assert paths(QOS.validate({**good, "lora": lora_cfg(coding_rate=4.5)})) \
        == [("lora", "coding_rate")]
    # A burst needs a rate: the error is on burst_bytes.
    assert paths(QOS.validate(cfg(QOS, name="b", burst_bytes=4096))) == [("burst_bytes",)]
    # 0 reads back as the default through the API: refused rather than a diff on every plan.
    assert paths(QOS.validate({**good, "ge_r_pct": 0})) == [("ge_r_pct",)]
    assert paths(QOS.validate({**good, "lora": lora_cfg(frequency_mhz=0)})) \
        == [("lora", "frequency_mhz")]
    # Every problem at once, each on its own attribute.
    many = QOS.validate({**good, "distribution": "x", "direction": "up", "delay_ms": -1,
                         "lora": lora_cfg(spreading_factor=13)})
    assert sorted(map(str, paths(many))) == sorted(map(str, [
        ("delay_ms",), ("distribution",), ("direction",), ("lora", "spreading_factor")]))
    # Unknown values are judged at plan, once known (and never blamed before).
    assert not QOS.validate({**good, "rate_bps": UNKNOWN, "burst_bytes": 4096}).items
    assert not QOS.validate({**good, "lora": lora_cfg(spreading_factor=UNKNOWN)}).items


def test_the_spec_errors_match_the_core_validator() -> None:
    """What validate reports is what the daemon would refuse (same validator)."""
    from infrasim_tui.core.qos import validate_qos_spec

    config = cfg(QOS, name="p", jitter_ms=-3)
    spec = qos_profile.spec_from_attrs(config)
    with pytest.raises(InvalidSpec) as err:
        validate_qos_spec(spec)
    assert qos_profile.spec_errors(config) == [(("jitter_ms",), err.value.reason)]


# -- pure: mapping and planning -------------------------------------------------------------


def test_spec_and_state_map_both_ways() -> None:
    attrs = cfg(QOS, name="radio", rate_bps=250_000, delay_ms=12.5, seed=7, direction="egress",
                lora=lora_cfg(spreading_factor=10, crc=False, duty_cycle_pct=1))
    spec = qos_profile.spec_from_attrs(attrs)
    assert spec.rate_bps == 250_000 and isinstance(spec.rate_bps, int)
    assert spec.delay_ms == 12.5 and spec.seed == 7 and spec.direction == "egress"
    assert spec.distribution == "uniform" and spec.ge_r_pct == 100  # defaults
    assert spec.lora is not None and spec.lora.spreading_factor == 10
    assert spec.lora.crc is False and spec.lora.bandwidth_khz == 125
    assert qos_profile.spec_from_attrs(cfg(QOS, name="x")).lora is None

    prof = QosProfile(meta=ResourceMeta(name="radio", id="q1"), spec=spec,
                      status=QosProfileStatus(attached_vm_ids=["v2", "v1"]))
    state = qos_profile.state_from_profile(prof, {"v1": "alpha", "v2": "beta"}, attrs)
    assert state["id"] == "q1" and state["attached_vms"] == ["alpha", "beta"]
    assert state["delay_ms"] == 12.5 and state["ge_r_pct"] == 100
    assert isinstance(state["ge_r_pct"], int)  # whole floats as terraform shows them
    assert state["lora"]["spreading_factor"] == 10 and state["lora"]["crc"] is False
    assert state["labels"] is None
    assert qos_profile.state_from_profile(prof, {}, {"labels": {}})["labels"] == {}
    # The state maps back to the same spec (an import then plans no change).
    assert qos_profile.spec_from_attrs(state) == spec


async def test_plan_fills_defaults_and_updates_in_place() -> None:
    config = cfg(QOS, name="wan", delay_ms=40, lora=lora_cfg(spreading_factor=9))
    created = await plan(QOS, None, config)
    p = created.planned
    assert is_unknown(p["id"]) and p["attached_vms"] == []
    assert p["delay_ms"] == 40 and p["rate_bps"] == 0 and p["distribution"] == "uniform"
    assert p["lora"]["spreading_factor"] == 9 and p["lora"]["coding_rate"] == 5
    assert p["lora"]["frequency_mhz"] == 868.1 and p["lora"]["crc"] is True
    assert not created.diags.items

    prior = {**p, "id": "q1", "attached_vms": ["a"]}
    same = await plan(QOS, prior, config)
    assert same.planned == prior and not same.requires_replace
    slower = await plan(QOS, prior, {**config, "delay_ms": 80})
    assert slower.planned["delay_ms"] == 80 and slower.planned["id"] == "q1"
    assert slower.planned["attached_vms"] == ["a"] and not slower.requires_replace
    # Removing an argument resets it to the default (it does not keep the old value).
    reset = await plan(QOS, prior, {**config, "delay_ms": None})
    assert reset.planned["delay_ms"] == 0
    no_radio = await plan(QOS, prior, {**config, "lora": None})
    assert no_radio.planned["lora"] is None and not no_radio.requires_replace
    assert (await plan(QOS, prior, {**config, "name": "wan2"})).requires_replace == [("name",)]
    assert (await plan(QOS, prior, {**config, "labels": {"a": "b"}})).requires_replace \
        == [("labels",)]
    # Values unknown at validate time are checked when the plan knows them.
    late = await plan(QOS, None, {**config, "loss_pct": 101})
    assert paths(late.diags) == [("loss_pct",)]


# -- pure: the VM's QoS attributes ----------------------------------------------------------


def vm_cfg(**values: Any) -> dict[str, Any]:
    base = {"name": "web", "kernel": "/k/Image", "initrd": "/k/initrd"}
    return cfg(VM_RES, **{**base, **values})


def test_vm_qos_validation_and_mapping() -> None:
    ok = vm_cfg(networks=["lan", "radio"], qos_profile="wan", network_qos={"radio": "lora"})
    assert not VM_RES.validate(ok).items
    stray = vm_cfg(networks=["lan"], network_qos={"elsewhere": "lora"})
    assert paths(VM_RES.validate(stray)) == [("network_qos", "elsewhere")]
    assert not VM_RES.validate(vm_cfg(networks=UNKNOWN, network_qos={"x": "p"})).items
    assert not VM_RES.validate(vm_cfg(networks=["lan"], network_qos={"lan": UNKNOWN})).items

    spec = vm.spec_from_attrs(ok)
    assert spec.qos_profile_id == "wan" and spec.nic_qos == {"radio": "lora"}
    spec.network_ids = ["n-lan", "n-radio"]
    spec.qos_profile_id, spec.nic_qos = "q-wan", {"n-radio": "q-lora"}
    model = VM(meta=ResourceMeta(name="web", id="v1"), spec=spec,
               status=VMStatus(state=VMState.STOPPED))
    nets = {"n-lan": "lan", "n-radio": "radio"}
    profiles = {"q-wan": "wan", "q-lora": "lora"}
    state = vm.state_from_vm(model, {}, nets, ok, profiles)
    assert state["qos_profile"] == "wan" and state["network_qos"] == {"radio": "lora"}
    # A configuration that named them by id reads back by id (no diff either way).
    by_id = vm.state_from_vm(model, {}, nets, {"qos_profile": "q-wan",
                                               "network_qos": {"radio": "q-lora"}}, profiles)
    assert by_id["qos_profile"] == "q-wan" and by_id["network_qos"] == {"radio": "q-lora"}
    spec.qos_profile_id, spec.nic_qos = "", {}
    bare = vm.state_from_vm(model, {}, nets, {"network_qos": {}})
    assert bare["qos_profile"] is None and bare["network_qos"] == {}

    # Profiles neither in the daemon nor planned by this process (names no test plans).
    refs = vm.spec_from_attrs(vm_cfg(networks=["lan"], qos_profile="edge-wan",
                                     network_qos={"lan": "edge-lora"}))
    assert paths(vm.missing_qos(refs, {"edge-wan": "q1"})) == [("network_qos", "lan")]
    assert paths(vm.missing_qos(refs, {})) == [("qos_profile",), ("network_qos", "lan")]
    common.note_planned("qos_profile", "edge-lora")
    assert paths(vm.missing_qos(refs, {})) == [("qos_profile",)]


async def test_vm_qos_change_plans_no_restart() -> None:
    config = vm_cfg(networks=["lan"], qos_profile="wan")
    planned = (await plan(VM_RES, None, config)).planned
    prior = {**planned, "id": "v1", "state": "RUNNING", "pid": 7, "accelerator_used": "tcg",
             "console_path": "/s", "serial_log": "/l", "qemu_version": "7.2.0"}
    for change in ({"qos_profile": "lora"}, {"network_qos": {"lan": "lora"}},
                   {"qos_profile": None}):
        p = await plan(VM_RES, prior, {**config, **change})
        assert not p.diags.items and not p.requires_replace, change  # no restart warning
        assert p.planned["pid"] == 7 and p.planned["state"] == "RUNNING"
        assert all(p.planned[k] == v for k, v in change.items())
    # Memory still restarts: the QoS attributes did not hide the other changes.
    more = await plan(VM_RES, prior, {**config, "memory_mb": 512, "qos_profile": "lora"})
    assert paths(more.diags, "warning") == [("memory_mb",)]


class RecordingCore:
    """Just enough of RemoteCore for VMResource.apply; records what reached QEMU."""

    def __init__(self, running: bool) -> None:
        self.calls: list[str] = []
        spec = VMSpec(kernel="/k/Image", initrd="/k/initrd", network_ids=["n-lan"],
                      qos_profile_id="q-wan")
        self.vm = VM(meta=ResourceMeta(name="web", id="v1", version=1), spec=spec,
                     status=VMStatus(state=VMState.RUNNING if running else VMState.STOPPED,
                                     pid=7 if running else 0))

    async def get_vm(self, ref: str) -> VM:
        return dataclasses.replace(self.vm, spec=dataclasses.replace(self.vm.spec))

    async def update_vm(self, new: VM, version: int) -> VM:
        self.calls.append("update_vm")
        self.vm = new
        return await self.get_vm(new.meta.id)

    async def stop_vm(self, ref: str, **kw: Any) -> VM:
        self.calls.append("stop_vm")
        self.vm.status = VMStatus(state=VMState.STOPPED)
        return self.vm

    async def start_vm(self, ref: str, **kw: Any) -> VM:
        self.calls.append("start_vm")
        self.vm.status = VMStatus(state=VMState.RUNNING, pid=8)
        return self.vm

    async def list_networks(self) -> list[Any]:
        return [_Named("n-lan", "lan")]

    async def list_volumes(self) -> list[Any]:
        return []

    async def list_qos_profiles(self) -> list[Any]:
        return [_Named("q-wan", "wan"), _Named("q-lora", "lora")]


@dataclasses.dataclass
class _Named:
    id: str
    name: str

    @property
    def meta(self) -> ResourceMeta:
        return ResourceMeta(id=self.id, name=self.name)


async def test_vm_qos_update_never_restarts_qemu() -> None:
    core = RecordingCore(running=True)

    async def get() -> Any:
        return core

    ctx = Context(get, asyncio.Event())
    config = vm_cfg(networks=["lan"], qos_profile="wan")
    prior = await VM_RES.read(ctx, cfg(VM_RES, id="v1", name="web"))
    assert prior is not None and prior["qos_profile"] == "wan" and prior["pid"] == 7
    assert prior["networks"] == ["lan"] and prior["network_qos"] is None
    changed = {**config, "qos_profile": None, "network_qos": {"lan": "lora"}}
    p = await plan(VM_RES, prior, changed, ctx)
    assert not p.diags.items
    result = await VM_RES.apply(ctx, prior, p.planned, changed)
    assert not result.diags.items, result.diags.items
    assert core.calls == ["update_vm"]  # live: QEMU neither stopped nor started
    assert core.vm.spec.nic_qos == {"n-lan": "q-lora"} and core.vm.spec.qos_profile_id == ""
    state = result.new_state
    assert state is not None and state["pid"] == 7
    assert state["network_qos"] == {"lan": "lora"} and state["qos_profile"] is None
    # An unknown profile fails the plan on the map key, and the apply too.
    ghost = {**config, "network_qos": {"lan": "ghost"}}
    p = await plan(VM_RES, prior, ghost, ctx)
    assert paths(p.diags) == [("network_qos", "lan")]
    failed = await VM_RES.apply(ctx, prior, p.planned, ghost)
    assert paths(failed.diags) == [("network_qos", "lan")]
    # A memory change in the same update does restart it.
    core.calls.clear()
    bigger = {**config, "memory_mb": 384}
    p = await plan(VM_RES, state, bigger, ctx)
    await VM_RES.apply(ctx, state, p.planned, bigger)
    assert core.calls == ["update_vm", "stop_vm", "start_vm"]


# -- the real terraform binary --------------------------------------------------------------

HEADER = """terraform {
  required_providers {
    infrasim = { source = "infrasim/infrasim" }
  }
}

provider "infrasim" {
  data_dir = "%(data)s"
}
"""


@pytest.fixture(scope="module")
def reattach() -> Iterator[str]:
    """One provider process for the module's terraform runs (no init, fast)."""
    proc = subprocess.Popen([PROVIDER, "--debug"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    value = ""
    deadline = time.monotonic() + 20
    while not value and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "TF_REATTACH_PROVIDERS=" in line:
            value = line.split("=", 1)[1].strip().strip("'")
    assert value, "the provider printed no TF_REATTACH_PROVIDERS"
    try:
        yield value
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


@pytest.fixture
def env(reattach: str) -> dict[str, str]:
    return {**os.environ, **TF_BASE, "TF_CLI_CONFIG_FILE": "/dev/null",
            "TF_REATTACH_PROVIDERS": reattach}


def tf(work: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    cmd = ["terraform", *args]
    if args[0] in ("plan", "apply", "destroy", "import"):
        cmd.insert(2, "-no-color")
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=180)


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, f"{r.args}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def clean(work: Path, env: dict[str, str]) -> None:
    r = tf(work, env, "plan", "-detailed-exitcode")
    assert r.returncode == 0, r.stdout + r.stderr


def profile_json(data_dir: Path, name: str) -> dict[str, Any] | None:
    r = infrasim(data_dir, "qos", "get", name, "-o", "json")
    return json.loads(r.stdout) if r.returncode == 0 else None


def qos_config(data_dir: Path, *, delay: str = "40", extra: str = "",
               lora: str = "spreading_factor = 9") -> str:
    return HEADER % {"data": data_dir} + f"""
resource "infrasim_qos_profile" "radio" {{
  name      = "radio"
  rate_bps  = 8000000
  delay_ms  = {delay}
  jitter_ms = 5
  loss_pct  = 0.1
  seed      = 42
{extra}
  lora {{
    {lora}
    distance_m     = 1500.5
    duty_cycle_pct = 1
  }}
}}
"""


def test_qos_profile_with_terraform(tmp_path: Path, data_dir: Path,
                                    env: dict[str, str]) -> None:
    work = tmp_path / "qos"
    work.mkdir()
    main = work / "main.tf"
    main.write_text(qos_config(data_dir))
    out = ok(tf(work, env, "apply", "-auto-approve"))
    assert "Resources: 1 added" in out, out
    prof = profile_json(data_dir, "radio")
    assert prof is not None
    spec = prof["spec"]
    assert spec["rate_bps"] == 8_000_000 and spec["delay_ms"] == 40 and spec["loss_pct"] == 0.1
    assert spec["seed"] == 42 and spec["distribution"] == "uniform"
    assert spec["lora"]["spreading_factor"] == 9 and spec["lora"]["distance_m"] == 1500.5
    assert spec["lora"]["duty_cycle_pct"] == 1 and spec["lora"]["coding_rate"] == 5
    clean(work, env)

    # delay changes in place (the daemon applies it live), same id
    main.write_text(qos_config(data_dir, delay="80"))
    plan = tf(work, env, "plan", "-detailed-exitcode")
    assert plan.returncode == 2, plan.stdout + plan.stderr
    assert "update in-place" in plan.stdout and "replace" not in plan.stdout, plan.stdout
    assert re.search(r"delay_ms\s+=\s+40\s+->\s+80", plan.stdout), plan.stdout
    ok(tf(work, env, "apply", "-auto-approve"))
    again = profile_json(data_dir, "radio")
    assert again is not None and again["spec"]["delay_ms"] == 80
    assert again["meta"]["id"] == prof["meta"]["id"]
    clean(work, env)
    # the lora block is changed in place too; removing it makes it a plain link
    main.write_text(qos_config(data_dir, delay="80", lora="spreading_factor = 12"))
    plan = tf(work, env, "plan")
    assert "update in-place" in plan.stdout and "replace" not in plan.stdout, plan.stdout
    ok(tf(work, env, "apply", "-auto-approve"))
    assert profile_json(data_dir, "radio")["spec"]["lora"]["spreading_factor"] == 12  # type: ignore[index]

    # invalid values fail the plan, each on its attribute's line
    main.write_text(qos_config(data_dir, delay="80", extra='  distribution = "gaussian"',
                               lora="spreading_factor = 13"))
    r = tf(work, env, "plan")
    text = r.stdout + r.stderr
    assert r.returncode == 1, text
    lines = {int(n) for n in re.findall(r"on main\.tf line (\d+)", text)}
    src = main.read_text().splitlines()
    blamed = {src[n - 1].split("=")[0].strip() for n in lines}
    assert blamed == {"distribution", "spreading_factor"}, text
    assert profile_json(data_dir, "radio")["spec"]["distribution"] == "uniform"  # type: ignore[index]
    main.write_text(qos_config(data_dir, delay="80", lora="spreading_factor = 12"))

    # import by name: no changes afterwards
    ok(tf(work, env, "state", "rm", "infrasim_qos_profile.radio"))
    ok(tf(work, env, "import", "infrasim_qos_profile.radio", "radio"))
    clean(work, env)

    # deleting a profile a VM uses is refused, naming the VM; the state stays
    kernel = tmp_path / "Image"
    kernel.write_bytes(b"\0" * 4096)
    r = infrasim(data_dir, "network", "create", "seg", "--mode", "segment",
                 "--subnet", "10.66.0.0/24")
    assert r.returncode == 0, r.stderr
    r = infrasim(data_dir, "vm", "create", "cli-vm", "--kernel", str(kernel), "--net", "seg",
                 "--qos", "radio")
    assert r.returncode == 0, r.stderr
    r = tf(work, env, "destroy", "-auto-approve")
    text = r.stdout + r.stderr
    assert r.returncode == 1 and "Cannot delete QoS profile radio" in text, text
    assert "cli-vm" in text, text
    assert profile_json(data_dir, "radio") is not None
    assert "infrasim_qos_profile.radio" in ok(tf(work, env, "state", "list"))
    assert infrasim(data_dir, "vm", "delete", "cli-vm").returncode == 0
    out = ok(tf(work, env, "destroy", "-auto-approve"))
    assert "Resources: 1 destroyed" in out, out
    assert profile_json(data_dir, "radio") is None


def vm_config(data_dir: Path, kernel: Path, nic_profile: str) -> str:
    return HEADER % {"data": data_dir} + f"""
resource "infrasim_network" "seg" {{
  name = "seg"
  mode = "segment"
  cidr = "10.66.0.0/24"
}}

resource "infrasim_qos_profile" "fast" {{
  name     = "fast"
  rate_bps = 50000000
}}

resource "infrasim_qos_profile" "slow" {{
  name     = "slow"
  rate_bps = 1000000
  delay_ms = 100
}}

resource "infrasim_vm" "node" {{
  name        = "node"
  kernel      = "{kernel}"
  running     = false
  networks    = [infrasim_network.seg.name]
  qos_profile = infrasim_qos_profile.fast.name
  network_qos = {{
    (infrasim_network.seg.name) = infrasim_qos_profile.{nic_profile}.name
  }}
}}
"""


def test_vm_nic_qos_with_terraform(tmp_path: Path, data_dir: Path,
                                   env: dict[str, str]) -> None:
    kernel = tmp_path / "Image"  # never booted: running = false
    kernel.write_bytes(b"\0" * 4096)
    work = tmp_path / "vm"
    work.mkdir()
    main = work / "main.tf"
    main.write_text(vm_config(data_dir, kernel, "fast"))
    out = ok(tf(work, env, "apply", "-auto-approve"))
    assert "Resources: 4 added" in out, out
    ids = {n: profile_json(data_dir, n)["meta"]["id"] for n in ("fast", "slow")}  # type: ignore[index]
    node = json.loads(infrasim(data_dir, "vm", "get", "node", "-o", "json").stdout)
    net_id = node["spec"]["network_ids"][0]
    assert node["spec"]["qos_profile_id"] == ids["fast"]
    assert node["spec"]["nic_qos"] == {net_id: ids["fast"]}
    clean(work, env)  # the refresh also shows fast's new user, without a diff

    # the NIC's profile changes in place: no restart, no replacement
    main.write_text(vm_config(data_dir, kernel, "slow"))
    plan = tf(work, env, "plan", "-detailed-exitcode")
    text = plan.stdout + plan.stderr
    assert plan.returncode == 2, text
    assert "infrasim_vm.node will be updated in-place" in text, text
    assert re.search(r'"seg"\s+=\s+"fast"\s+->\s+"slow"', text), text
    assert "replace" not in text and "restart" not in text.lower(), text
    ok(tf(work, env, "apply", "-auto-approve"))
    node = json.loads(infrasim(data_dir, "vm", "get", "node", "-o", "json").stdout)
    assert node["spec"]["nic_qos"] == {net_id: ids["slow"]}
    assert node["meta"]["id"] and node["status"]["state"] == "STOPPED"
    clean(work, env)
    assert profile_json(data_dir, "slow")["status"]["attached_vm_ids"] == [node["meta"]["id"]]  # type: ignore[index]

    out = ok(tf(work, env, "destroy", "-auto-approve"))
    assert "Resources: 4 destroyed" in out, out
    assert json.loads(infrasim(data_dir, "qos", "list", "-o", "json").stdout) == []


@pytest.mark.qemu
def test_the_qos_example_reshapes_running_guests_live(tmp_path: Path, data_dir: Path,
                                                      cloud_kit: GuestKit,
                                                      env: dict[str, str]) -> None:
    """examples/terraform/qos as documented: two running guests on a segment; a profile's
    delay and a NIC's profile change in place while QEMU keeps running (same pids)."""
    import shutil

    from .conftest import REPO, qemu_pids

    work = tmp_path / "example"
    shutil.copytree(REPO / "examples" / "terraform" / "qos", work)
    main = work / "main.tf"
    ours = f'provider "infrasim" {{\n  data_dir = "{data_dir}"\n}}'
    main.write_text(main.read_text().replace('provider "infrasim" {}', ours))
    args = ["-var", f"kernel={cloud_kit.kernel}", "-var", f"initrd={cloud_kit.initrd}"]
    out = ok(tf(work, env, "apply", "-auto-approve", *args))
    assert "Resources: 5 added" in out, out
    outputs = json.loads(ok(tf(work, env, "output", "-json")))
    assert outputs["vms"]["value"] == {"gateway": "RUNNING", "sensor": "RUNNING"}
    assert tf(work, env, "plan", "-detailed-exitcode", *args).returncode == 0
    pids = sorted(qemu_pids(data_dir))
    assert len(pids) == 2

    text = main.read_text()
    text = re.sub(r"delay_ms\s+=\s+40", "delay_ms = 80", text)
    text = text.replace("= infrasim_qos_profile.radio.name", "= infrasim_qos_profile.wan.name")
    main.write_text(text)
    plan = tf(work, env, "plan", "-detailed-exitcode", *args)
    said = plan.stdout + plan.stderr
    assert plan.returncode == 2 and "0 to add, 2 to change, 0 to destroy" in said, said
    assert "restart" not in said.lower(), said
    ok(tf(work, env, "apply", "-auto-approve", *args))
    assert sorted(qemu_pids(data_dir)) == pids  # applied live: the guests kept running
    wan = profile_json(data_dir, "wan")
    assert wan is not None and wan["spec"]["delay_ms"] == 80
    sensor = json.loads(infrasim(data_dir, "vm", "get", "sensor", "-o", "json").stdout)
    assert list(sensor["spec"]["nic_qos"].values()) == [wan["meta"]["id"]]
    assert tf(work, env, "plan", "-detailed-exitcode", *args).returncode == 0

    out = ok(tf(work, env, "destroy", "-auto-approve", *args))
    assert "Resources: 5 destroyed" in out, out
    assert qemu_pids(data_dir) == []
