"""Terraform provider benchmarks (issue 6), with the real terraform binary, offline.

1. Provider cold start to its handshake line (the TLS path terraform uses), median of 20,
   against the floor of any Python gRPC plugin: `python -c "import grpc"` (goal ≤ 120 ms).
2. `terraform plan` with 20 VMs in state: the provider launched by terraform (through the
   filesystem mirror) vs one reattached provider process vs a config of 20 `terraform_data`
   resources (terraform's own floor), same run.
3. `terraform apply` creating 10 VMs vs the CLI creating and starting the same 10 (ratio).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
PROVIDER = str(BIN / "terraform-provider-infrasim")
INFRASIM = str(BIN / "infrasim")
COOKIE = "d602bf8f470bc67ca7faa0386276bbdd4330efaf76d1a219cb4d6991ca9872b2"
TF_ENV = {"TF_IN_AUTOMATION": "1", "CHECKPOINT_DISABLE": "1", "TF_INPUT": "0"}


def client_cert() -> str:
    """Any PEM certificate will do: terraform sends one, the provider only needs TLS on."""
    d = Path(tempfile.mkdtemp())
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=bench", "-days", "1",
                    "-keyout", str(d / "k.pem"), "-out", str(d / "c.pem")],
                   check=True, capture_output=True)
    pem = (d / "c.pem").read_text()
    shutil.rmtree(d)
    return pem


def cold_start(rounds: int = 20) -> dict[str, float]:
    env = {**os.environ, "TF_PLUGIN_MAGIC_COOKIE": COOKIE, "PLUGIN_PROTOCOL_VERSIONS": "5,6",
           "PLUGIN_MIN_PORT": "10000", "PLUGIN_MAX_PORT": "25000",
           "PLUGIN_CLIENT_CERT": client_cert()}
    ours, floor = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        p = subprocess.Popen([PROVIDER], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
        assert p.stdout is not None
        line = p.stdout.readline()
        ours.append(time.perf_counter() - t0)
        assert line.startswith("1|6|"), line
        p.send_signal(signal.SIGTERM)
        p.wait(10)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import grpc"], check=True)
        floor.append(time.perf_counter() - t0)
    return {"provider_ms": statistics.median(ours) * 1e3,
            "import_grpc_ms": statistics.median(floor) * 1e3}


def tf(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(["terraform", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode not in (0, 2):
        raise RuntimeError(f"terraform {' '.join(args)}: {r.stdout[-1500:]}{r.stderr[-1500:]}")
    return time.perf_counter() - t0


def vm_config(data: Path, kit: Any, n: int, start: bool) -> str:
    head = ('terraform {\n  required_providers {\n    infrasim = { source = "infrasim/infrasim" }\n'
            f'  }}\n}}\nprovider "infrasim" {{\n  data_dir = "{data}"\n}}\n')
    body = "".join(
        f'resource "infrasim_vm" "v{i}" {{\n  name = "bench-{i:02d}"\n  memory_mb = 64\n'
        f'  kernel = "{kit.kernel}"\n  initrd = "{kit.initrd}"\n'
        f'  cmdline = "quiet cryptomgr.notests"\n  running = {str(start).lower()}\n}}\n'
        for i in range(n))
    return head + body


def median_of(fn: Any, rounds: int) -> float:
    return statistics.median(fn() for _ in range(rounds))


async def run() -> dict[str, Any]:
    from infrasim_tui.core.guest import build_guest

    kit = build_guest("cloud")
    out: dict[str, Any] = {"cold_start": cold_start()}
    data = Path(tempfile.mkdtemp(prefix="infrasim-bench-tf-"))
    work = Path(tempfile.mkdtemp(prefix="infrasim-bench-tfw-"))
    installed = json.loads(subprocess.run([INFRASIM, "--data-dir", str(data), "terraform",
                                           "install", "-o", "json"], check=True,
                                          capture_output=True, text=True).stdout)
    env = {**os.environ, **TF_ENV, "TF_CLI_CONFIG_FILE": installed["cli_config"]}
    debug: subprocess.Popen[str] | None = None
    try:
        # 2. plan with 20 VMs in state (stopped VMs: plan cost is the provider's, not QEMU's)
        (work / "fleet").mkdir()
        (work / "fleet" / "main.tf").write_text(vm_config(data, kit, 20, start=False))
        tf(["init"], work / "fleet", env)
        tf(["apply", "-auto-approve"], work / "fleet", env)
        launched = median_of(lambda: tf(["plan"], work / "fleet", env), 5)
        debug = subprocess.Popen([PROVIDER, "--debug"], stdout=subprocess.PIPE, text=True,
                                 stderr=subprocess.DEVNULL)
        assert debug.stdout is not None
        reattach = ""
        while not reattach:
            line = debug.stdout.readline()
            if "TF_REATTACH_PROVIDERS=" in line:
                reattach = line.split("=", 1)[1].strip().strip("'")
        renv = {**env, "TF_REATTACH_PROVIDERS": reattach}
        reattached = median_of(lambda: tf(["plan"], work / "fleet", renv), 5)
        (work / "floor").mkdir()
        (work / "floor" / "main.tf").write_text("".join(
            f'resource "terraform_data" "d{i}" {{\n  input = "x{i}"\n}}\n' for i in range(20)))
        fenv = {**os.environ, **TF_ENV, "TF_CLI_CONFIG_FILE": "/dev/null"}
        tf(["init"], work / "floor", fenv)
        tf(["apply", "-auto-approve"], work / "floor", fenv)
        floor = median_of(lambda: tf(["plan"], work / "floor", fenv), 5)
        tf(["destroy", "-auto-approve"], work / "fleet", renv)
        out["plan_20"] = {"launched_s": launched, "reattach_s": reattached,
                          "terraform_data_s": floor}

        # 3. apply creating (and starting) 10 VMs vs the CLI doing the same
        (work / "ten").mkdir()
        (work / "ten" / "main.tf").write_text(vm_config(data, kit, 10, start=True))
        tf(["init"], work / "ten", env)
        applied = tf(["apply", "-auto-approve"], work / "ten", env)
        tf(["destroy", "-auto-approve"], work / "ten", renv)
        t0 = time.perf_counter()
        for i in range(10):
            subprocess.run([INFRASIM, "--data-dir", str(data), "vm", "create", f"cli-{i:02d}",
                            "--memory", "64", "--kernel", str(kit.kernel), "--initrd",
                            str(kit.initrd), "--cmdline", "quiet cryptomgr.notests", "--start"],
                           check=True, capture_output=True)
        cli = time.perf_counter() - t0
        for i in range(10):
            subprocess.run([INFRASIM, "--data-dir", str(data), "vm", "delete", f"cli-{i:02d}",
                            "--force"], check=True, capture_output=True)
        out["apply_10"] = {"terraform_s": applied, "cli_s": cli}
    finally:
        if debug is not None:
            debug.send_signal(signal.SIGTERM)
            debug.wait(10)
        subprocess.run([INFRASIM, "--data-dir", str(data), "vm", "list"], capture_output=True)
        from infrasim_tui.core.lock import DataDirLock
        from infrasim_tui.core.paths import DataDir

        pid = DataDirLock.owner_pid(DataDir(data))
        if pid:
            os.kill(pid, signal.SIGTERM)
            time.sleep(1)
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return out


def report(r: dict[str, Any]) -> str:
    c, p, a = r["cold_start"], r["plan_20"], r["apply_10"]
    return "\n".join([
        f"1. provider cold start to handshake (TLS), median of 20: {c['provider_ms']:.0f} ms "
        f"(goal <= 120 ms); `python -c 'import grpc'` {c['import_grpc_ms']:.0f} ms -> "
        f"{c['provider_ms'] / c['import_grpc_ms']:.2f}x",
        f"2. terraform plan, 20 VMs in state (median of 5): launched provider "
        f"{p['launched_s'] * 1e3:.0f} ms, reattached {p['reattach_s'] * 1e3:.0f} ms, "
        f"20 terraform_data {p['terraform_data_s'] * 1e3:.0f} ms -> launched "
        f"{p['launched_s'] / p['terraform_data_s']:.2f}x, reattached "
        f"{p['reattach_s'] / p['terraform_data_s']:.2f}x the floor",
        f"3. create+start 10 VMs: terraform apply {a['terraform_s']:.2f} s vs the CLI "
        f"{a['cli_s']:.2f} s -> {a['terraform_s'] / a['cli_s']:.2f}x",
    ])
