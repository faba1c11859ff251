"""The A/B benchmark protocol for a noisy machine, and the machine record every benchmark's JSON carries.

`compare(sides, rounds)` starts one worker process per side (`Side(name, argv)`: a command that calls `serve`).
A worker loads its model and warms up (compiles) once, untimed, then answers each `run` line on its stdin by
timing `steps` calls (one round) and replying with one marked JSON line. The parent runs the sides one at a time,
so they never compete for the cores, alternating which goes first each round (a drift of the machine's speed
falls on both) and pausing between them (an idle side's spinning thread pools go quiet). Before each round it
records the 1-minute load average, and over each side's turn the cores that processes other than the workers
kept busy (/proc/stat less the workers' /proc/PID/stat) and each worker's own cores (`worker_cores`: whether the
waiting one spins).

Contract of the result: each side's figure per round is the median of that round's calls; `sides[name]` and
`ratio` (seconds of the second side / seconds of the first, per round: >1 means the first is faster) hold the
median, min, max and spread = (max - min) / median over rounds. The verdict is "clean" only when every spread
is <= `Thresholds.max_spread`, the load before the first worker started was < `max_load_per_core` x cores (later
load averages include the workers' own recent work, so only that one is a fact about the machine), and no turn
saw more than `max_foreign_cores` cores busy outside the workers; otherwise "noisy", with the reasons.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

from o1jax import host_allocator
from o1jax.files import atomic_write_json

MARK = "@@bench "  # prefixes the worker's replies: anything else its libraries print passes through
VERSIONED = ("jax", "jaxlib", "flax", "numpy", "torch", "transformers", "peft")


@dataclasses.dataclass(frozen=True)
class Thresholds:
  max_spread: float = 0.10
  max_load_per_core: float = 0.5
  max_foreign_cores: float = 0.25


@dataclasses.dataclass(frozen=True)
class Side:
  name: str
  argv: list[str]
  env: dict[str, str] | None = None  # the worker's environment (None: this process's)


@dataclasses.dataclass
class Workload:
  """What a worker times: `run()` is one call; `warmup()` (default `run`) is called once before any round;
  `info` (JSON) goes back to the parent with the ready message, `after()` (JSON) with every round."""
  run: Callable[[], object]
  info: dict = dataclasses.field(default_factory=dict)
  warmup: Callable[[], object] | None = None
  after: Callable[[], dict] = dict


# ---- the machine ----

def cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def git_commit() -> str | None:
  root = pathlib.Path(__file__).resolve().parents[2]
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                           text=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return None
  if commit.returncode:
    return None
  return commit.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def versions() -> dict[str, str | None]:
  """Installed versions, read from package metadata: nothing is imported."""
  out = {"python": platform.python_version()}
  for name in VERSIONED:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def load_average() -> float | None:
  try:
    return os.getloadavg()[0]
  except OSError:
    return None


def machine() -> dict:
  """The machine as the JSON is written, after the run: its load then holds the run's own work (a comparison's
  `load_before` and each round's load are the ones its verdict reads)."""
  return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "cpu_model": cpu_model(), "cpu_cores": os.cpu_count(), "os": platform.platform(),
          "load_average_1m_when_written": load_average(), "versions": versions(), "git_commit": git_commit()}


def _busy_ticks() -> int | None:
  try:
    fields = [int(x) for x in pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
  except (OSError, ValueError, IndexError):
    return None
  return sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # less idle and iowait


def _process_ticks(pid: int) -> int | None:
  try:
    # Fields after the parenthesised command name: utime, stime, cutime, cstime are the 12th-15th.
    rest = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
  except (OSError, IndexError):
    return None
  return sum(int(x) for x in rest[11:15])


# ---- figures and verdict ----

def summarize(values: list[float]) -> dict:
  """Median, min, max and spread = (max - min) / median of per-round figures."""
  median = statistics.median(values)
  lo, hi = min(values), max(values)
  return {"median": median, "min": lo, "max": hi, "spread": (hi - lo) / median if median else float("inf"),
          "values": list(values)}


def verdict(summaries: dict[str, dict], load_before: float | None, cores: int, foreign: list[float | None],
            limits: Thresholds) -> tuple[str, list[str]]:
  """("clean", []) or ("noisy", the reasons) for named summaries, the load before the run and each turn's
  foreign busy cores."""
  reasons = [f"{name} spread {s['spread']:.0%} > {limits.max_spread:.0%}" for name, s in summaries.items()
             if s["spread"] > limits.max_spread]
  if load_before is not None and load_before >= limits.max_load_per_core * cores:
    reasons.append(f"load {load_before:.2f} before the run >= {limits.max_load_per_core * cores:.2f} "
                   f"({limits.max_load_per_core} x {cores} cores)")
  busiest = max((f for f in foreign if f is not None), default=None)
  if busiest is not None and busiest > limits.max_foreign_cores:
    reasons.append(f"other processes kept {busiest:.2f} cores busy during a turn (> {limits.max_foreign_cores})")
  return ("noisy" if reasons else "clean"), reasons


def describe(result: dict, label: str) -> str:
  """One line: the ratio with its range when clean; when noisy, says so first and gives the range, not a ratio."""
  r, n = result["ratio"], len(result["rounds"])
  span = f"{r['min']:.2f}x-{r['max']:.2f}x over {n} rounds"
  if result["verdict"] == "clean":
    return f"{label} = {r['median']:.2f}x (median; {span}, spread {r['spread']:.0%}; clean)"
  return f"{label}: NOISY, no clean ratio ({'; '.join(result['reasons'])}): {span}, median {r['median']:.2f}x"


# ---- the worker ----

def _reply(payload: dict) -> None:
  sys.stdout.write(MARK + json.dumps(payload) + "\n")
  sys.stdout.flush()


def serve(setup: Callable[[], Workload], steps: int, min_seconds: float = 0.0) -> None:
  """The worker's side: set up, warm up, say ready; then one timed round per `run` line until `quit` or EOF. A
  round is `steps` calls, and more until it has lasted `min_seconds`: a median of a few 20 ms steps is at the
  mercy of one timer tick or page fault."""
  work = setup()
  (work.warmup or work.run)()
  _reply({"ready": True, "info": {**work.info, "host_allocator": host_allocator.active()}})
  for line in sys.stdin:
    if line.strip() != "run":
      break
    seconds = []
    while len(seconds) < steps or sum(seconds) < min_seconds:
      start = time.perf_counter()
      work.run()
      seconds.append(time.perf_counter() - start)
    _reply({"seconds": seconds, **work.after()})


# ---- the parent ----

class _Worker:
  def __init__(self, side: Side):
    self.side = side
    self.proc = subprocess.Popen(side.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=side.env)

  def read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith(MARK):
        return json.loads(line[len(MARK):])
      sys.stdout.write(line)
    status = self.proc.wait()
    raise RuntimeError(f"the {self.side.name} worker exited with status {status} (its log is above)")

  def round(self) -> dict:
    self.proc.stdin.write("run\n")
    self.proc.stdin.flush()
    return self.read()

  def close(self) -> None:
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
      except BrokenPipeError:
        pass
      try:
        self.proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()


def compare(sides: tuple[Side, Side], rounds: int, *, pause: float = 1.0, limits: Thresholds = Thresholds(),
            load_before: float | None = None) -> dict:
  """Runs the protocol above; raises RuntimeError when a worker dies. A suite comparing several workloads passes
  the load it saw before its first one: later load averages still hold the earlier workloads' own work."""
  if rounds < 1:
    raise ValueError("rounds must be >= 1")
  if load_before is None:
    load_before = load_average()
  workers = []
  try:
    info = {}
    for side in sides:  # started and warmed up one after the other: no compile competes with another
      workers.append(_Worker(side))
      info[side.name] = workers[-1].read()["info"]
    records = []
    for r in range(rounds):
      order = workers if r % 2 == 0 else workers[::-1]
      record = {"load_average_1m": load_average(), "order": [w.side.name for w in order], "seconds": {},
                "foreign_cores": {}, "after": {}}
      for w in order:
        time.sleep(pause)
        ticks = [_busy_ticks(), *(_process_ticks(x.proc.pid) for x in workers)]
        start = time.perf_counter()
        reply = w.round()
        elapsed = time.perf_counter() - start
        end = [_busy_ticks(), *(_process_ticks(x.proc.pid) for x in workers)]
        foreign = None
        if None not in ticks and None not in end:
          per_second = os.sysconf("SC_CLK_TCK") * elapsed
          cores = {x.side.name: (e - b) / per_second for x, e, b in zip(workers, end[1:], ticks[1:])}
          foreign = max(0.0, (end[0] - ticks[0]) / per_second - sum(cores.values()))
          record.setdefault("worker_cores", {})[w.side.name] = cores
        record["seconds"][w.side.name] = reply.pop("seconds")
        record["foreign_cores"][w.side.name] = foreign
        record["after"][w.side.name] = reply
      records.append(record)
  finally:
    for w in workers:
      w.close()
  return assemble(sides, records, info, load_before, limits)


def assemble(sides: tuple[Side, Side], records: list[dict], info: dict, load_before: float | None,
             limits: Thresholds, cores: int | None = None) -> dict:
  """The result of `compare` from its per-round records (a function of its inputs: testable on made-up rounds)."""
  a, b = (s.name for s in sides)
  per_round = {name: [statistics.median(r["seconds"][name]) for r in records] for name in (a, b)}
  summaries = {f"{name} seconds": summarize(v) for name, v in per_round.items()}
  ratio = summarize([tb / ta for ta, tb in zip(per_round[a], per_round[b])])
  foreign = [f for r in records for f in r["foreign_cores"].values()]
  cores = cores or os.cpu_count() or 1
  state, reasons = verdict({**summaries, "ratio": ratio}, load_before, cores, foreign, limits)
  return {"protocol": {"rounds": len(records), "steps_per_round": {n: [len(r["seconds"][n]) for r in records]
                                                                    for n in (a, b)},
                       "warmup": "one untimed call per worker before the first round",
                       "order": "one side at a time, alternating which goes first", "thresholds":
                       dataclasses.asdict(limits), "cores": cores},
          "load_before": load_before, "info": info, "rounds": records,
          "sides": {name: summaries[f"{name} seconds"] for name in (a, b)},
          "ratio": dict(ratio, of=f"{b} seconds / {a} seconds"), "verdict": state, "reasons": reasons}


def write_json(path: str, suite: str, body: dict) -> None:
  """`body` with the suite's name and `machine()`, written atomically (key-sorted: stable diffs when committed)."""
  atomic_write_json(path, {"suite": suite, "machine": machine(), **body})
  print(f"wrote {path}")
