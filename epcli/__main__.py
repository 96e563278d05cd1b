"""``python -m epcli`` runs the command line."""

from epcli.cli.app import main

main()
