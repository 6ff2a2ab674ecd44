# Two VMs on a VM-to-VM segment, their links shaped by QoS profiles: a lossy WAN link for every
# NIC by default, and a LoRa radio link for the sensor's NIC. Run it offline:
#
#   export TF_CLI_CONFIG_FILE=$(infrasim terraform install -o json | jq -r .cli_config)
#   terraform init
#   terraform apply \
#     -var kernel=$(infrasim guest build -o json | jq -r .kernel) \
#     -var initrd=$(infrasim guest build -o json | jq -r .initrd)
#
# Changing a profile (say delay_ms = 80) or which profile a NIC uses applies live: the plan is
# an in-place update and the guests keep running. `infrasim network stats field` shows the
# links.

terraform {
  required_providers {
    infrasim = { source = "infrasim/infrasim" }
  }
}

variable "kernel" {
  type        = string
  description = "guest kernel (infrasim guest build -o json)"
}

variable "initrd" {
  type        = string
  description = "guest initrd"
}

provider "infrasim" {}

resource "infrasim_network" "field" {
  name = "field"
  mode = "segment"
  cidr = "10.77.0.0/24"
}

# tc/netem-style: 8 Mbit/s with a 32 KiB bucket, 40 ms +- 5 ms, 1 % random loss, reproducible.
resource "infrasim_qos_profile" "wan" {
  name         = "wan"
  rate_bps     = 8000000
  burst_bytes  = 32768
  delay_ms     = 40
  jitter_ms    = 5
  distribution = "normal"
  loss_pct     = 1
  seed         = 42
}

# A LoRa link: SF9 at 125 kHz, 200 m away (near the ~240 m this path-loss fit allows at SF9, so
# shadowing loses some frames), EU868 1 % duty cycle. Frames wait their time on air and are
# lost below the SF's sensitivity or when they collide.
resource "infrasim_qos_profile" "radio" {
  name = "radio"
  seed = 7

  lora {
    spreading_factor = 9
    bandwidth_khz    = 125
    coding_rate      = 5
    tx_power_dbm     = 14
    distance_m       = 200
    duty_cycle_pct   = 1
  }
}

resource "infrasim_vm" "gateway" {
  name        = "gateway"
  kernel      = var.kernel
  initrd      = var.initrd
  cmdline     = "infrasim.hostname=gateway cryptomgr.notests"
  networks    = [infrasim_network.field.name]
  qos_profile = infrasim_qos_profile.wan.name
  # the tiny test guest ignores the power button: force the stop after 5 s
  shutdown_timeout = "5s"
}

resource "infrasim_vm" "sensor" {
  name     = "sensor"
  kernel   = var.kernel
  initrd   = var.initrd
  cmdline  = "infrasim.hostname=sensor cryptomgr.notests"
  networks = [infrasim_network.field.name]
  network_qos = {
    (infrasim_network.field.name) = infrasim_qos_profile.radio.name
  }
  shutdown_timeout = "5s"
}

output "vms" {
  value = { for v in [infrasim_vm.gateway, infrasim_vm.sensor] : v.name => v.state }
}
