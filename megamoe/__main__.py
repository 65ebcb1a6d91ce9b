"""`python -m megamoe ...` is the `megamoe` command."""

from megamoe.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
