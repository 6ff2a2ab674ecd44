# Two VMs, each on its own copy-on-write overlay of one base volume, on one network, with a
# snapshot of the first. Run it offline:
#
#   export TF_CLI_CONFIG_FILE=$(infrasim terraform install -o json | jq -r .cli_config)
#   terraform init
#   terraform apply \
#     -var kernel=$(infrasim guest build -o json | jq -r .kernel) \
#     -var initrd=$(infrasim guest build -o json | jq -r .initrd)
#
# `terraform plan` afterwards shows no changes; `infrasim vm stop web-1` shows as drift.

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

# The local data dir's daemon, started when none answers. Set data_dir, or address + token
# for a daemon elsewhere.
provider "infrasim" {}

data "infrasim_host" "this" {}

resource "infrasim_volume" "base" {
  name = "base"
  size = "256M"
}

resource "infrasim_volume" "root" {
  for_each = toset(["web-1", "web-2"])
  name     = "${each.key}-root"
  base     = infrasim_volume.base.name
}

resource "infrasim_network" "lan" {
  name = "lan"
  mode = "user"
}

resource "infrasim_vm" "web" {
  for_each  = toset(["web-1", "web-2"])
  name      = each.key
  cpu_cores = 1
  memory_mb = 256
  kernel    = var.kernel
  initrd    = var.initrd
  cmdline   = "infrasim.hostname=${each.key} cryptomgr.notests"
  volumes   = [infrasim_volume.root[each.key].name]
  networks  = [infrasim_network.lan.name]
  labels    = { app = "web" }
  # the tiny test guest ignores the power button: force the stop after 5 s
  shutdown_timeout = "5s"

  port_forward {
    host_port  = each.key == "web-1" ? 18080 : 18081
    guest_port = 80
  }

  timeouts {
    create = "2m"
    delete = "1m"
  }
}

resource "infrasim_snapshot" "web1_baseline" {
  vm          = infrasim_vm.web["web-1"].name
  name        = "baseline"
  description = "right after terraform created it"
}

output "accelerator" {
  value = data.infrasim_host.this.accelerator
}

output "vms" {
  value = { for k, v in infrasim_vm.web : k => { state = v.state, pid = v.pid } }
}
