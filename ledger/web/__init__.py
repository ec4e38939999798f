"""Read-only web console."""
