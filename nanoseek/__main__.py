"""`python -m nanoseek` (and `torchrun ... -m nanoseek <command>`): the `nanoseek` command."""
from nanoseek.cli import main

if __name__ == "__main__":
    main()
