"""One process: the first SIGTERM/SIGINT sets the stop flag the loop reads after its step, a second one ends the
process, and the old handlers come back after the run (the several-process agreement is tests/test_multiprocess.py's)."""
import os
import signal
import subprocess
import sys

import jax.numpy as jnp

from o1jax.training import preemption


def test_a_signal_stops_at_the_step_boundary_and_handlers_come_back():
  before = signal.getsignal(signal.SIGTERM)
  # Whatever the process started with: default_int_handler, or SIG_IGN under a shell that ran it in the background.
  before_int = signal.getsignal(signal.SIGINT)
  output = jnp.zeros(())
  with preemption.stop_signals() as stop:
    assert not stop.reached(1, output)
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.reached(2, output) and stop.reason == "SIGTERM"
  assert signal.getsignal(signal.SIGTERM) is before
  with preemption.stop_signals() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.reached(1, output) and stop.reason == "SIGINT"
  assert signal.getsignal(signal.SIGINT) is before_int


def test_a_second_signal_ends_the_process_at_once():
  code = ("import os, signal, time\n"
          "from o1jax.training import preemption\n"
          "with preemption.stop_signals():\n"
          "  os.kill(os.getpid(), signal.SIGTERM)\n"
          "  os.kill(os.getpid(), signal.SIGTERM)\n"
          "  time.sleep(30)\n"
          "print('not reached')\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert proc.returncode == -signal.SIGTERM and "not reached" not in proc.stdout
