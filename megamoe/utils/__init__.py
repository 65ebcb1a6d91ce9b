"""Small shared helpers (filesystem, locks, process trees, the host CPU)."""
