import signal
import sys

from pipeline.cli import main

code = main()
# The stage has finished and said how; a Ctrl-C or SIGTERM during the interpreter's teardown would
# only turn that into a death by signal (Python restores their default actions while tearing down).
for number in (signal.SIGINT, signal.SIGTERM):
    signal.signal(number, signal.SIG_IGN)
sys.exit(code)
