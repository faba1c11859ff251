"""Launchers: every script parses (`bash -n`), every XLA flag preset is documented and known to the compiler that
reads it, dry runs print the expected commands, and launch/local.sh really starts joined processes and propagates
a failure.
"""
import importlib.util
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
PRESETS = sorted(LAUNCH.glob("xla_flags/*.flags"))
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def clean_env(**extra) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("XLA_", "JAX_", "LIBTPU_", "O1_", "SLURM_", "TPU_"))}
  env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **extra)
  return env


def run(*argv, env=None, timeout=120) -> subprocess.CompletedProcess:
  return subprocess.run(list(argv), cwd=ROOT, env=env or clean_env(), capture_output=True, text=True,
                        timeout=timeout)


def commands(stdout: str) -> list[list[str]]:
  """The argv of every command a dry run printed ("+ " lines are shell-quoted)."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def preset_flags(path: pathlib.Path) -> list[str]:
  return [line.split("#")[0].strip() for line in path.read_text().splitlines()
          if line.split("#")[0].strip()]


def test_launchers_exist_and_parse():
  assert {p.name for p in SCRIPTS} >= {"common.sh", "local.sh", "tpu_pod.sh", "slurm.sbatch"}
  for script in SCRIPTS:
    proc = run("bash", "-n", str(script))
    assert proc.returncode == 0, (script, proc.stderr)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_preset_flag_is_documented(path):
  lines = path.read_text().splitlines()
  assert lines[0].startswith("#"), f"{path.name}: starts with a description of the hardware"
  flags = 0
  for i, line in enumerate(lines):
    if line and not line.startswith("#"):
      flags += 1
      assert line.startswith("--") and " " not in line, f"{path.name}:{i + 1}: one --flag=value per line"
      assert lines[i - 1].startswith("#"), f"{path.name}:{i + 1}: {line} has no comment above it"
  assert flags


def test_presets_cover_the_hardware():
  assert {p.stem for p in PRESETS} >= {"cpu", "gpu_h100", "tpu_v4", "tpu_v5p", "tpu_v5e", "tpu_v6e"}


@pytest.mark.parametrize("name", ["cpu", "gpu_h100"])
def test_xla_flags_presets_are_known_to_this_xla(name):
  """XLA aborts on an unknown flag in XLA_FLAGS (GPU flags included, on any backend): the check can fail."""
  flags = " ".join(preset_flags(LAUNCH / "xla_flags" / f"{name}.flags"))
  probe = [sys.executable, "-c", "import jax; print(jax.devices()[0].platform)"]
  ok = run(*probe, env=clean_env(JAX_PLATFORMS="cpu", XLA_FLAGS=flags))
  assert ok.returncode == 0 and ok.stdout.strip() == "cpu", ok.stderr[-2000:]
  bad = run(*probe, env=clean_env(JAX_PLATFORMS="cpu", XLA_FLAGS=flags + " --xla_gpu_no_such_flag=true"))
  assert bad.returncode != 0 and "xla_gpu_no_such_flag" in bad.stderr


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (pip install -r requirements-tpu.txt)")
@pytest.mark.parametrize("name, topology", [("tpu_v4", "v4:2x2x1"), ("tpu_v5p", "v5p:2x2x1"),
                                            ("tpu_v5e", "v5e:2x2"), ("tpu_v6e", "v6e:2x2")])
def test_tpu_presets_are_accepted_by_libtpu(name, topology):
  """libtpu parses LIBTPU_INIT_ARGS when the TPU compiler loads and rejects unknown flags. (No TPU here: its
  lockfile need not serialise the probes.)"""
  flags = " ".join(preset_flags(LAUNCH / "xla_flags" / f"{name}.flags"))
  probe = [sys.executable, "-c", "from jax.experimental import topologies; "
           f"print(len(topologies.get_topology_desc(platform='tpu', topology_name='{topology}').devices))"]
  ok = run(*probe, env=clean_env(LIBTPU_INIT_ARGS=flags, ALLOW_MULTIPLE_LIBTPU_LOAD="1"))
  assert ok.returncode == 0, ok.stderr[-2000:]
  bad = run(*probe, env=clean_env(LIBTPU_INIT_ARGS=flags + " --xla_tpu_no_such_flag=true",
                                  ALLOW_MULTIPLE_LIBTPU_LOAD="1"))
  assert bad.returncode != 0 and "xla_tpu_no_such_flag" in bad.stdout + bad.stderr


def test_local_dry_run_prints_one_joined_process_per_rank():
  proc = run("bash", "launch/local.sh", "--dry-run", "--processes=3", "--devices=2", "--port=4321",
             "--logdir=runs/x", "--", "--config=configs/tiny_cpu.py", "--config.train.steps=3")
  assert proc.returncode == 0, proc.stderr
  cmds = commands(proc.stdout)
  assert cmds[0] == ["mkdir", "-p", "runs/x"]
  flags = " ".join(preset_flags(LAUNCH / "xla_flags" / "cpu.flags"))
  for rank, cmd in enumerate(cmds[1:]):
    assert cmd == ["env", "JAX_PLATFORMS=cpu", f"XLA_FLAGS={flags} --xla_force_host_platform_device_count=2",
                   "JAX_COORDINATOR_ADDRESS=127.0.0.1:4321", "JAX_NUM_PROCESSES=3", f"JAX_PROCESS_ID={rank}",
                   "python", "-m", "o1jax.train", "--config=configs/tiny_cpu.py", "--config.train.steps=3"]
  assert len(cmds) == 4
  assert "> runs/x/process_2.log" in proc.stdout


def test_local_runs_joined_processes_and_stops_on_failure(tmp_path):
  """Real processes: 2 x 2 CPU devices train one tiny_cpu step; a bad config fails every rank with status 1."""
  ok = run("bash", "launch/local.sh", "--processes=2", "--devices=2", f"--logdir={tmp_path / 'ok'}", "--",
           "--config=configs/tiny_cpu.py", "--config.train.steps=1", "--config.checkpoint.dir=",
           "--config.log.tensorboard_dir=", f"--config.log.jsonl={tmp_path / 'ok.jsonl'}", timeout=600)
  logs = [(tmp_path / "ok" / f"process_{i}.log").read_text() for i in range(2)]
  assert ok.returncode == 0, ok.stderr + "\n".join(log[-2000:] for log in logs)
  for i, log in enumerate(logs):
    assert f"jax.distributed: process {i} of 2" in log
  assert '"step": 1' in (tmp_path / "ok.jsonl").read_text()  # only process 0 logs metrics

  bad = run("bash", "launch/local.sh", "--processes=2", "--devices=2", f"--logdir={tmp_path / 'bad'}", "--",
            "--config=configs/tiny_cpu.py", "--config.train.group_size=1")
  assert bad.returncode == 1
  assert "exited with status 1" in bad.stderr
  assert "config.train.group_size=1" in (tmp_path / "bad" / "process_1.log").read_text()


def test_local_rejects_bad_options():
  assert run("bash", "launch/local.sh", "--procs=2", "--", "--config=x").returncode == 2
  assert run("bash", "launch/local.sh", "--preset=nope", "--", "--config=x").returncode == 2
  assert run("bash", "launch/local.sh").returncode == 2


def tpu_dry_run(*args) -> subprocess.CompletedProcess:
  return run("bash", "launch/tpu_pod.sh", "--dry-run", "--tpu=o1-pod", "--zone=us-east5-a", "--project=proj",
             "--run=m7", *args)


TRAIN_ARGS = ["--config=configs/mistral7b.py:lora", "--config.model.path=/mnt/Mistral-7B-v0.1",
              "--config.data.train_files=('gs://bucket/o1/train-*.tfrecord',)",
              "--config.checkpoint.dir=gs://bucket/ckpt/m7"]


def test_tpu_pod_train_dry_run():
  proc = tpu_dry_run("--hosts=10.0.0.2,10.0.0.3", "--preset=tpu_v5e", "train", "--", *TRAIN_ARGS)
  assert proc.returncode == 0, proc.stderr
  (cmd,) = commands(proc.stdout)
  assert cmd[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "o1-pod", "--zone=us-east5-a",
                     "--project=proj", "--worker=all"]
  remote = cmd[9].removeprefix("--command=")
  assert run("bash", "-n", "-c", remote).returncode == 0
  words = shlex.split(remote)
  flags = " ".join(preset_flags(LAUNCH / "xla_flags" / "tpu_v5e.flags"))
  assert f"LIBTPU_INIT_ARGS={flags}" in words and "TPU_WORKER_HOSTNAMES=10.0.0.2,10.0.0.3;" in words
  start = words.index("o1jax.train")
  assert words[start - 3:start + 1 + len(TRAIN_ARGS)] == ["nohup", "python3", "-m", "o1jax.train", *TRAIN_ARGS]
  assert "logs/m7/$(hostname).log" in words and "logs/m7/$(hostname).pid" in words


def test_tpu_pod_dry_run_asks_gcloud_for_the_workers_without_hosts():
  proc = tpu_dry_run("train", "--", *TRAIN_ARGS)
  describe, ssh = commands(proc.stdout)
  assert describe == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "o1-pod", "--zone=us-east5-a",
                      "--project=proj", "--format=value(networkEndpoints[].ipAddress)"]
  assert "TPU_WORKER_HOSTNAMES=<worker-ips>;" in shlex.split(ssh[-1].removeprefix("--command="))


def test_tpu_pod_multi_slice_train_dry_run():
  """--slices=2: one ssh per slice of the queued resource, each with its slice's workers, the DCN (MEGASCALE_*)
  variables naming slice 0's first worker and its own slice index, and the trainer told the mesh's dcn_data."""
  proc = tpu_dry_run("--slices=2", "train", "--", *TRAIN_ARGS)
  assert proc.returncode == 0, proc.stderr
  describe0, ssh0, describe1, ssh1 = commands(proc.stdout)
  for i, (describe, ssh) in enumerate([(describe0, ssh0), (describe1, ssh1)]):
    assert describe[4:6] == ["describe", f"o1-pod-{i}"]
    assert ssh[4:6] == ["ssh", f"o1-pod-{i}"] and "--worker=all" in ssh
    remote = ssh[-1].removeprefix("--command=")
    assert run("bash", "-n", "-c", remote).returncode == 0
    words = shlex.split(remote)
    assert f"TPU_WORKER_HOSTNAMES=<o1-pod-{i}-ips>" in words
    assert {"MEGASCALE_COORDINATOR_ADDRESS=<o1-pod-0-ips>:8080", "MEGASCALE_PORT=8080", "MEGASCALE_NUM_SLICES=2",
            f"MEGASCALE_SLICE_ID={i};"} <= set(words)
    start = words.index("o1jax.train")
    assert words[start + 1:start + 2 + len(TRAIN_ARGS)] == ["--config.mesh.dcn_data=2", *TRAIN_ARGS]


def test_tpu_pod_multi_slice_actions_reach_every_slice():
  (stop0, stop1) = commands(tpu_dry_run("--slices=2", "stop").stdout)
  assert [stop0[5], stop1[5]] == ["o1-pod-0", "o1-pod-1"]
  _, scp0, scp1 = commands(tpu_dry_run("--slices=2", "logs").stdout)
  assert [scp0[5], scp1[5]] == ["o1-pod-0:o1jax/logs/m7/*.log", "o1-pod-1:o1jax/logs/m7/*.log"]
  assert len(commands(tpu_dry_run("--slices=2", "setup").stdout)) == 5  # archive, 2 copies, 2 installs
  assert tpu_dry_run("--slices=2", "--hosts=10.0.0.2", "train", "--", "--config=x").returncode == 2
  assert tpu_dry_run("--slices=0", "stop").returncode == 2


def test_tpu_pod_setup_logs_stop_dry_runs():
  commit = run("git", "rev-parse", "--short", "HEAD").stdout.strip()
  archive, scp, ssh = commands(tpu_dry_run("setup").stdout)
  assert archive == ["git", "archive", "--format=tar.gz", "-o", f"/tmp/o1jax-{commit}.tar.gz", "HEAD"]
  assert scp[4:7] == ["scp", f"/tmp/o1jax-{commit}.tar.gz", f"o1-pod:o1jax-{commit}.tar.gz"]
  assert "--worker=all" in scp
  assert "pip install -q -r requirements.txt -r requirements-tpu.txt" in ssh[-1]
  mkdir, scp = commands(tpu_dry_run("logs").stdout)
  assert mkdir == ["mkdir", "-p", "logs/m7"] and scp[4:7] == ["scp", "o1-pod:o1jax/logs/m7/*.log", "logs/m7/"]
  (stop,) = commands(tpu_dry_run("stop").stdout)
  assert stop[-1] == "--command=kill -TERM $(cat o1jax/logs/m7/*.pid)"


def test_tpu_pod_exec_runs_one_command_on_every_worker():
  (ssh,) = commands(tpu_dry_run("exec", "--", "gcloud", "storage", "cp", "-r", "gs://b/Mistral 7B", "/mnt/m7").stdout)
  assert "--worker=all" in ssh
  remote = ssh[-1].removeprefix("--command=")
  assert shlex.split(remote) == ["cd", "o1jax", "&&", "gcloud", "storage", "cp", "-r", "gs://b/Mistral 7B", "/mnt/m7"]


def test_tpu_pod_rejects_incomplete_command_lines():
  assert run("bash", "launch/tpu_pod.sh", "--dry-run", "--zone=z", "train", "--", "--config=x").returncode == 2
  assert tpu_dry_run("--", "--config=x").returncode == 2  # no action
  assert tpu_dry_run("train").returncode == 2  # no trainer arguments
  assert tpu_dry_run("exec").returncode == 2  # no command
  assert tpu_dry_run("--hosts=a,b", "--preset=nope", "train", "--", "--config=x").returncode == 2


def test_slurm_dry_run_prints_environment_and_srun():
  proc = run("bash", "launch/slurm.sbatch", *TRAIN_ARGS, env=clean_env(O1_DRY_RUN="1"))
  assert proc.returncode == 0, proc.stderr
  xla, mem, srun = commands(proc.stdout)
  flags = " ".join(preset_flags(LAUNCH / "xla_flags" / "gpu_h100.flags"))
  assert xla == ["export", f"XLA_FLAGS={flags}"]
  assert mem == ["export", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"]
  assert srun == ["srun", "--kill-on-bad-exit=1", "--label", "python", "-m", "o1jax.train", *TRAIN_ARGS]


def test_slurm_script_declares_one_task_per_gpu():
  """jax.distributed under SLURM drives GPU number SLURM_LOCALID in each process: tasks per node = GPUs per node,
  and no per-task GPU binding."""
  directives = dict((line.removeprefix("#SBATCH --").split("=", 1) + [""])[:2]
                    for line in (LAUNCH / "slurm.sbatch").read_text().splitlines() if line.startswith("#SBATCH --"))
  assert "exclusive" in directives
  assert directives["ntasks-per-node"] == directives["gpus-per-node"]
  assert "gpus-per-task" not in directives and "gpu-bind" not in directives


def test_slurm_user_flags_follow_the_preset():
  proc = run("bash", "launch/slurm.sbatch", "--config=x",
             env=clean_env(O1_DRY_RUN="1", O1_PRESET="cpu", XLA_FLAGS="--xla_dump_to=/tmp/d"))
  assert commands(proc.stdout)[0] == ["export", "XLA_FLAGS=--xla_cpu_multi_thread_eigen=false --xla_dump_to=/tmp/d"]


def readme_commands(prefix: str) -> list[str]:
  """Commands of launch/README.md's code blocks that start with `prefix` (continuation lines joined)."""
  text = (LAUNCH / "README.md").read_text()
  blocks = text.split("```")[1::2]
  lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
  return [line.split("  #")[0].strip() for line in lines if line.startswith(prefix)]


def test_readme_launcher_examples_dry_run():
  """Every launcher command the README shows is valid for the launcher as it is (run as a dry run)."""
  examples = readme_commands("launch/") + readme_commands("O1_DRY_RUN=1 bash launch/")
  # sbatch passes what follows the script to it: the same arguments through the script's own dry run.
  examples += ["O1_DRY_RUN=1 bash launch/slurm.sbatch" + c.split("launch/slurm.sbatch", 1)[1]
               for c in readme_commands("sbatch ")]
  assert len(examples) >= 9
  for command in examples:
    script, _, rest = command.partition(" ")
    dry = f"{script} --dry-run {rest}" if script.startswith("launch/") else command
    proc = run("bash", "-c", dry)
    assert proc.returncode == 0, (command, proc.stderr)
    assert proc.stdout.startswith("+ "), command
