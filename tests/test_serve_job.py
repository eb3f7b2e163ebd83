"""`python jobs/serve.py` on the embedded default: one "ready:" line, then it answers on 127.0.0.1; SIGTERM stops it."""

import os
import signal
import socket
import subprocess
import sys
import time

import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_serve_job_starts_answers_and_stops():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "jobs", "serve.py"), "--port", str(port), "--steps", "2"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    try:
        deadline = time.time() + 240
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready:") or time.time() > deadline:
                break
        assert lines and lines[-1].startswith(f"ready: http://127.0.0.1:{port}"), "".join(lines)[-3000:]
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30).json() == {"status": "ok"}
        ref = os.path.join(REPO, "video2lora", "assets", "demo", "ref_spin-pixelate.mp4")
        r = requests.post(f"http://127.0.0.1:{port}/generate", files={"reference": open(ref, "rb")},
                          data={"prompt": "a red circle", "seed": "1"}, timeout=120)
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4" and len(r.content) > 1000
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 0
