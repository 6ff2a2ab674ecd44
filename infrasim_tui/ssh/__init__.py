"""The console served over SSH: one App per session in the daemon's loop, roles per key."""
