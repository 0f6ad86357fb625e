"""Imported by datatrove's forkserver only (``set_forkserver_preload`` in
:mod:`preprocessing.executors`), before it forks any task process: every task process
holds a lifeline to the run (:mod:`preprocessing.lifeline`) and ignores Ctrl-C (SIGINT
reaches the whole foreground process group; the run itself stops its tasks, so a Ctrl-C
is one line, not a traceback per task). The forkserver hands its children the SIGINT
disposition it had after its preload, which is why this is done here."""

import signal

from preprocessing import lifeline

lifeline.install()
signal.signal(signal.SIGINT, signal.SIG_IGN)
