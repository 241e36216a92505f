"""``python -m fastsparse ...`` is the command line (for ``torchrun -m fastsparse train ...``)."""
from .cli import main

main()
