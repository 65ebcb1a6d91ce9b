"""The `megamoe` command line."""
