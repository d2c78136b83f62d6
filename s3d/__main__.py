"""`python -m s3d` (and `torchrun -m s3d ...`) runs the `s3d` command."""

from s3d.cli import main

main()
