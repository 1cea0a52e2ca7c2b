"""``python -m retrieval.cli`` (and ``torchrun -m retrieval.cli``): the `retrieval` command."""

from .group import main

main()
