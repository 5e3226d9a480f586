"""Checkpoints: restore across meshes (8 devices -> 1 -> 8) and SIGKILL-then-resume."""

import json
import os
import signal
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_train_worker.py")


def _env(devices: int) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _run(args, devices):
    proc = subprocess.run([sys.executable, WORKER, *args], env=_env(devices), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def _same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_restore_onto_other_meshes(tmp_path):
    """Saved on 8 devices (2x2x2), restored on 1 device, and a 1-device save restored on 8."""
    eight_to_one, one_to_eight = str(tmp_path / "a"), str(tmp_path / "b")
    _run(["ckpt_save", eight_to_one, "--mesh", "2", "2", "2", "--seed", "5"], 8)
    _run(["ckpt_restore", eight_to_one], 1)
    saved = dict(np.load(os.path.join(eight_to_one, "saved.npz")))
    _same(saved, dict(np.load(os.path.join(eight_to_one, "restored_1.npz"))))
    with open(os.path.join(eight_to_one, "restored_1.json")) as f:
        info = json.load(f)
    assert info["step"] == 3 and info["host"] == {"round": 2, "tau": [0.9, 0.85], "step": 3}
    assert info["data"] == "\x00grain-state"

    _run(["ckpt_save", one_to_eight, "--seed", "6"], 1)
    _run(["ckpt_restore", one_to_eight, "--mesh", "2", "2", "2"], 8)
    _same(dict(np.load(os.path.join(one_to_eight, "saved.npz"))), dict(np.load(os.path.join(one_to_eight, "restored_8.npz"))))


def test_sigkill_after_step_7_resumes_from_5_to_the_same_params(tmp_path):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    out = _run(["resumable", full], 1)
    assert "step 10" in out and "done" in out

    proc = subprocess.Popen(
        [sys.executable, WORKER, "resumable", killed], env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line.strip())
            if line.strip() == "step 7":
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL and "done" not in seen, seen
    assert not os.path.exists(os.path.join(killed, "params.npz"))

    resumed = _run(["resumable", killed], 1)
    assert resumed.splitlines()[0].startswith("resumed 5 "), resumed
    assert json.loads(resumed.splitlines()[0].split(" ", 2)[2]) == {"round": 1, "step": 5}
    assert "step 6" in resumed and "step 10" in resumed

    a, b = dict(np.load(os.path.join(full, "params.npz"))), dict(np.load(os.path.join(killed, "params.npz")))
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6

    def batches(directory):  # step -> fingerprint of the batch it trained on
        with open(os.path.join(directory, "batches.txt")) as f:
            return [tuple(int(x) for x in line.split()) for line in f]

    uninterrupted, interrupted = batches(full), batches(killed)
    assert [s for s, _ in uninterrupted] == list(range(1, 11))
    # The killed run read batches 1..7 (or 8), then the resumed run re-read 6..10 exactly.
    resumed_part = [entry for entry in interrupted if entry[0] >= 6][-5:]
    assert resumed_part == uninterrupted[5:]
    assert dict(interrupted[:5]) == dict(uninterrupted[:5])
