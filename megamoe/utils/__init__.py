"""Small shared helpers (filesystem, hashing)."""
