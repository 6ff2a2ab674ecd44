"""terraform-provider-infrasim: a Terraform provider (plugin protocol 6) over the daemon."""
