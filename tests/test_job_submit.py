"""`ray job submit` against a local `ray start --head` cluster runs the batch job end to end."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pandas as pd
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A head node on free ports, in its own process group so that stopping it touches no other Ray."""
    dash = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dash, "--dashboard-agent-listen-port": free_port(),
             "--dashboard-agent-grpc-port": free_port(), "--metrics-export-port": free_port(),
             "--runtime-env-agent-port": free_port(), "--node-manager-port": free_port(),
             "--object-manager-port": free_port(), "--ray-client-server-port": free_port()}
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block", "--num-cpus=2",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--disable-usage-stats"]
    cmd += [f"{k}={v}" for k, v in ports.items()]
    proc = subprocess.Popen(cmd, env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited: {(tmp_path / 'head.log').read_text()[-2000:]}")
            time.sleep(1)
    else:
        pytest.fail("the Ray dashboard did not come up in 120 s")
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_ray_job_submit_runs_batch_job(ray_head, tiny_backbone_dir, tmp_path):
    from conftest import save_model_for

    address, env = ray_head
    out = tmp_path / "out"
    checkpoint = save_model_for(tiny_backbone_dir, str(tmp_path / "ckpt"))  # trained stand-in: a clean run
    cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit", "--address", address,
           "--working-dir", REPO, "--", "python", "jobs/batch_generate.py", "--output", str(out), "--gallery",
           "--backbone", tiny_backbone_dir, "--checkpoint", checkpoint, "--steps", "2", "--actor-num-cpus", "0.25"]
    deadline = time.time() + 60
    while True:  # the job agent can take a few seconds after the dashboard is up
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in r.stdout + r.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "succeeded" in r.stdout
    # a clean run's log (what `ray job logs` shows; before it, the CLI's own lines about packaging the working dir)
    # has nothing that looks like a fault
    assert "Tailing logs" in r.stdout
    job_log = r.stdout.split("Tailing logs", 1)[1]
    for looks_like_a_fault in ("Progress bars disabled", "deprecated", "core_worker.cc", "Traceback", " ERROR ",
                               " E ", "WARNING", "Warning:"):
        assert looks_like_a_fault not in job_log, (looks_like_a_fault, job_log[-3000:])
    # what it does print: our progress bar, to its last row, and the summary
    assert "videos: 100%" in job_log and "12/12" in job_log, job_log[-3000:]
    assert "done: 12 made, 0 skipped, 0 failed" in job_log, job_log[-3000:]
    res = pd.read_parquet(out / "results.parquet")
    assert len(res) == 12 and set(res.status) == {"ok"}
    assert len(os.listdir(out / "videos")) == 12
    # --gallery wrote the results page: a generated preview per row, made by Ray tasks on the cluster
    page = (out / "index.html").read_text()
    assert page.count('alt="generated"') == 12
    assert len([f for f in os.listdir(out / "gallery") if f.endswith(".out.gif")]) == 12
    # jobs/gallery.py writes the same page again for an existing output, on the same cluster
    os.remove(out / "index.html")
    shutil.rmtree(out / "gallery")
    g = subprocess.run(cmd[:cmd.index("--") + 1] + ["python", "jobs/gallery.py", str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert g.returncode == 0 and "gallery: " in g.stdout, (g.stdout + g.stderr)[-3000:]
    assert (out / "index.html").read_text() == page
    # and refuses a directory that is not a batch job's output, saying so
    bad = subprocess.run([sys.executable, os.path.join(REPO, "jobs", "gallery.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "has no results.parquet" in bad.stderr
