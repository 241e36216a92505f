"""``python -m fastsparse ...`` is the command line (for ``torchrun -m fastsparse train ...``)."""
from .experiments.cli import main

main()
