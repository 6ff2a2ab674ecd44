"""InfraSim: a Terraform-compatible QEMU virtualization platform driven from a terminal."""

__version__ = "0.1.0"
