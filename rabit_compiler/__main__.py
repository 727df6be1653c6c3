"""``python -m rabit_compiler`` is the ``rabit`` command."""

from rabit_compiler.cli import main

main()
