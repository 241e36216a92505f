"""One module per source system, each with ``convert(text) -> dict``; see :mod:`fastsparse.convert`."""
