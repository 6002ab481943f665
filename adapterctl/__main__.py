"""`python -m adapterctl` runs the `adapters` command."""

from adapterctl.cli import main

if __name__ == "__main__":
    main()
