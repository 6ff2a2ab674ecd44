"""gRPC API (``infrasim.v1``): server, client helpers and their authentication."""
