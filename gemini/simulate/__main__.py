"""``python -m gemini.simulate``: the same as the ``gemini-simulate`` console script."""

from gemini.simulate.cli import main

main()
