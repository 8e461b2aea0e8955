"""``python -m tailorlm.cli``: the same command line as ``tailorlm``."""

from tailorlm.cli import main

main()
