import sys

from smearscope.cli import main

raise SystemExit(main(["export", *sys.argv[1:]]))
