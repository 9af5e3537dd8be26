"""``python -m pipeline`` and ``torchrun -m pipeline``: the ``diffusion`` command line."""

from pipeline.cli import main

if __name__ == "__main__":
    main()
