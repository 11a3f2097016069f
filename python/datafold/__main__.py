"""`python -m datafold ...` runs the datafold-backup command line."""

from .cli import run

if __name__ == "__main__":
    run()
