"""`python -m igcam_cli ...` (and `torchrun -m igcam_cli ...`) runs the igcam command line."""

from igcam_cli.cli import main

main()
