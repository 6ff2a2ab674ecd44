"""The real `terraform` binary against the provider, offline.

The journey goes through the filesystem mirror written by `infrasim terraform install` (the
real launch path: go-plugin handshake with TLS, several provider processes per command):
init, apply (two VMs boot to their banner, a base volume with an overlay per VM, a network, a
snapshot), no-op plan, an in-place update, a replacement, drift after a stop outside
terraform, import by name, destroy with no QEMU left. Diagnostics and Ctrl-C use a reattached
provider to stay fast.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from infrasim_tui.core.guest import READY_BANNER, GuestKit

from .conftest import INFRASIM, infrasim, qemu_pids, wait_sync

PROVIDER = str(Path(INFRASIM).with_name("terraform-provider-infrasim"))
TF_BASE = {"TF_IN_AUTOMATION": "1", "CHECKPOINT_DISABLE": "1", "TF_INPUT": "0"}

HEADER = """terraform {
  required_providers {
    infrasim = { source = "infrasim/infrasim" }
  }
}

provider "infrasim" {
  data_dir = "%(data)s"
}
"""


def tf(work: Path, env: dict[str, str], *args: str,
       timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = ["terraform", *args]
    if args and args[0] in ("init", "plan", "apply", "destroy", "import", "validate"):
        cmd.insert(2, "-no-color")
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True,
                          timeout=timeout)


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, f"{r.args}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def vm_json(data_dir: Path, name: str) -> dict[str, object] | None:
    r = infrasim(data_dir, "vm", "get", name, "-o", "json")
    return json.loads(r.stdout) if r.returncode == 0 else None


def booted(data_dir: Path, name: str) -> bool:
    r = infrasim(data_dir, "console", name, "--log")
    return READY_BANNER in r.stdout


@pytest.fixture
def mirror_env(data_dir: Path) -> dict[str, str]:
    r = infrasim(data_dir, "terraform", "install", "-o", "json")
    assert r.returncode == 0, r.stderr
    installed = json.loads(r.stdout)
    assert Path(installed["cli_config"]).is_file() and Path(installed["mirror"]).is_dir()
    return {**os.environ, **TF_BASE, "TF_CLI_CONFIG_FILE": installed["cli_config"]}


@pytest.fixture
def reattach_env(data_dir: Path) -> Iterator[dict[str, str]]:
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
        yield {**os.environ, **TF_BASE, "TF_CLI_CONFIG_FILE": "/dev/null",
               "TF_REATTACH_PROVIDERS": value}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def journey_config(data_dir: Path, kit: GuestKit, *, b_memory: int = 256,
                   b_name: str = "tf-b") -> str:
    return HEADER % {"data": data_dir} + f"""
resource "infrasim_volume" "base" {{
  name = "tf-base"
  size = "64M"
}}

resource "infrasim_volume" "disk_a" {{
  name = "tf-a-disk"
  base = infrasim_volume.base.name
}}

resource "infrasim_volume" "disk_b" {{
  name = "tf-b-disk"
  base = infrasim_volume.base.name
}}

resource "infrasim_network" "lan" {{
  name = "tf-lan"
  mode = "user"
}}

resource "infrasim_vm" "a" {{
  name      = "tf-a"
  memory_mb = 256
  kernel    = "{kit.kernel}"
  initrd    = "{kit.initrd}"
  cmdline   = "quiet cryptomgr.notests"
  # the test guest ignores the power button: do not wait the default 30 s before forcing
  shutdown_timeout = "1s"
  volumes   = [infrasim_volume.disk_a.name]
  networks  = [infrasim_network.lan.name]
  labels    = {{ team = "qa" }}
}}

resource "infrasim_vm" "b" {{
  name      = "{b_name}"
  memory_mb = {b_memory}
  kernel    = "{kit.kernel}"
  initrd    = "{kit.initrd}"
  cmdline   = "quiet cryptomgr.notests"
  shutdown_timeout = "1s"
  volumes   = [infrasim_volume.disk_b.name]
}}

resource "infrasim_snapshot" "a_first" {{
  vm          = infrasim_vm.a.name
  name        = "first"
  description = "taken by terraform"
}}

output "a_state" {{
  value = infrasim_vm.a.state
}}
"""


def test_journey_through_the_filesystem_mirror(tmp_path: Path, data_dir: Path,
                                               cloud_kit: GuestKit,
                                               mirror_env: dict[str, str]) -> None:
    work = tmp_path / "tf"
    work.mkdir()
    main = work / "main.tf"
    main.write_text(journey_config(data_dir, cloud_kit))
    ok(tf(work, mirror_env, "init"))
    assert (work / ".terraform.lock.hcl").is_file()

    out = ok(tf(work, mirror_env, "apply", "-auto-approve"))
    assert "Apply complete! Resources: 7 added" in out, out
    for name in ("tf-a", "tf-b"):
        assert wait_sync(lambda n=name: booted(data_dir, n), 90), f"{name} did not boot"
    assert ok(tf(work, mirror_env, "output", "-raw", "a_state")) == "RUNNING"
    assert tf(work, mirror_env, "plan", "-detailed-exitcode").returncode == 0

    # in place: memory of a running VM (it is restarted, and the plan says so)
    pid_b = vm_json(data_dir, "tf-b")["status"]["pid"]  # type: ignore[index]
    main.write_text(journey_config(data_dir, cloud_kit, b_memory=192))
    plan = tf(work, mirror_env, "plan", "-detailed-exitcode")
    assert plan.returncode == 2 and "update in-place" in plan.stdout, plan.stdout
    assert "restart" in (plan.stdout + plan.stderr).lower()
    ok(tf(work, mirror_env, "apply", "-auto-approve"))
    b = vm_json(data_dir, "tf-b")
    assert b["spec"]["memory_mb"] == 192 and b["status"]["pid"] != pid_b  # type: ignore[index]

    # replacement: the name forces a new VM
    main.write_text(journey_config(data_dir, cloud_kit, b_memory=192, b_name="tf-b2"))
    plan = tf(work, mirror_env, "plan")
    assert "must be replaced" in plan.stdout, plan.stdout
    ok(tf(work, mirror_env, "apply", "-auto-approve"))
    assert vm_json(data_dir, "tf-b") is None and vm_json(data_dir, "tf-b2") is not None

    # drift: stopped outside terraform shows on `running`
    assert infrasim(data_dir, "vm", "stop", "tf-a", "--force").returncode == 0
    plan = tf(work, mirror_env, "plan", "-detailed-exitcode")
    assert plan.returncode == 2 and re.search(r"running\s+=\s+false\s+->\s+true", plan.stdout), \
        plan.stdout
    ok(tf(work, mirror_env, "apply", "-auto-approve"))
    assert vm_json(data_dir, "tf-a")["status"]["state"] == "RUNNING"  # type: ignore[index]

    # import by name: no changes afterwards
    ok(tf(work, mirror_env, "state", "rm", "infrasim_vm.b"))
    ok(tf(work, mirror_env, "import", "infrasim_vm.b", "tf-b2"))
    plan = tf(work, mirror_env, "plan", "-detailed-exitcode")
    assert plan.returncode == 0, plan.stdout

    out = ok(tf(work, mirror_env, "destroy", "-auto-approve"))
    assert "Destroy complete! Resources: 7 destroyed" in out, out
    assert qemu_pids(data_dir) == []
    assert json.loads(infrasim(data_dir, "vm", "list", "-o", "json").stdout) == []


def test_invalid_configurations_point_at_the_line(tmp_path: Path, data_dir: Path,
                                                  cloud_kit: GuestKit,
                                                  reattach_env: dict[str, str]) -> None:
    cases = {
        "memory": ('  memory_mb = 0\n', "memory_mb"),
        "raspi": ('  machine = "raspi3b"\n  memory_mb = 2048\n  dtb = "/x.dtb"\n', "memory_mb"),
        "volume": ('  volumes = ["no-such-volume"]\n', "volumes"),
    }
    for case, (extra, attr) in cases.items():
        work = tmp_path / case
        work.mkdir()
        body = (f'resource "infrasim_vm" "bad" {{\n  name = "bad-{case}"\n'
                f'  kernel = "{cloud_kit.kernel}"\n{extra}}}\n')
        (work / "main.tf").write_text(HEADER % {"data": data_dir} + body)
        r = tf(work, reattach_env, "plan")
        text = r.stdout + r.stderr
        assert r.returncode == 1, text
        assert "on main.tf line" in text and attr in text, text
    assert json.loads(infrasim(data_dir, "vm", "list", "-o", "json").stdout) == []


class _Slow(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(64 << 20))
        self.end_headers()
        try:
            for _ in range(6400):
                self.wfile.write(b"\0" * 10240)
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args: object) -> None:
        pass


def test_ctrl_c_during_a_long_create_exits_promptly(tmp_path: Path, data_dir: Path,
                                                     reattach_env: dict[str, str]) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    work = tmp_path / "slow"
    work.mkdir()
    url = f"http://127.0.0.1:{server.server_address[1]}/disk.img"
    (work / "main.tf").write_text(HEADER % {"data": data_dir} + f"""
resource "infrasim_volume" "slow" {{
  name   = "slow"
  source = "{url}"
}}
""")
    proc = subprocess.Popen(["terraform", "apply", "-auto-approve"], cwd=work, env=reattach_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_sync(lambda: infrasim(data_dir, "volume", "list", "-o", "json")
                         .returncode == 0, 30)
        time.sleep(3)  # well inside the download
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        server.shutdown()
        if proc.poll() is None:
            proc.kill()
    assert took < 15, f"terraform took {took:.1f} s to stop\n{out}"
    assert "Interrupt received" in out, out
    vols = json.loads(infrasim(data_dir, "volume", "list", "-o", "json").stdout)
    assert [v for v in vols if v["status"].get("path") and
            not Path(v["status"]["path"]).exists()] == []  # no record without its file
    assert qemu_pids(data_dir) == []


def test_the_example_applies_as_documented(tmp_path: Path, data_dir: Path, cloud_kit: GuestKit,
                                           mirror_env: dict[str, str]) -> None:
    import shutil

    from .conftest import REPO

    work = tmp_path / "example"
    shutil.copytree(REPO / "examples" / "terraform", work)
    main = work / "main.tf"
    # point the example's provider at this test's data dir (it uses the default one)
    ours = f'provider "infrasim" {{\n  data_dir = "{data_dir}"\n}}'
    main.write_text(main.read_text().replace('provider "infrasim" {}', ours))
    ok(tf(work, mirror_env, "init"))
    args = ["-var", f"kernel={cloud_kit.kernel}", "-var", f"initrd={cloud_kit.initrd}"]
    out = ok(tf(work, mirror_env, "apply", "-auto-approve", *args))
    assert "Resources: 7 added" in out, out
    assert tf(work, mirror_env, "plan", "-detailed-exitcode", *args).returncode == 0
    outputs = json.loads(ok(tf(work, mirror_env, "output", "-json")))
    assert outputs["accelerator"]["value"] in ("tcg", "kvm", "hvf")
    assert {v["state"] for v in outputs["vms"]["value"].values()} == {"RUNNING"}
    ok(tf(work, mirror_env, "destroy", "-auto-approve", *args))
    assert qemu_pids(data_dir) == []
