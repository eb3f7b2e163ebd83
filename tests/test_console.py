"""The batch job's console: warnings raised inside its Ray actors reach the driver's output (what `ray job logs`
shows), their INFO lines do not (the same Ray settings as pipelines/batch.py: init_ray, quiet stage actors)."""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import logging, time
    import pandas as pd
    import ray
    from pipelines.common import init_ray
    from pipelines.config import BatchJobConfig
    from pipelines.stages import set_torch_threads

    class Stage:  # set up like the hypernetwork and generation stages
        def __init__(self):
            set_torch_threads(BatchJobConfig())
            self.log = logging.getLogger("pipelines.stages")
        def __call__(self, batch):
            self.log.info("stage info line, not for the console")
            self.log.warning("stage warning: reference ref7.mp4 decoded fewer frames than expected")
            return batch

    init_ray(num_cpus=1, include_dashboard=False)
    ds = ray.data.from_pandas(pd.DataFrame({"x": [1, 2]})).map_batches(
        Stage, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.25)
    assert len(ds.take_all()) == 2
    time.sleep(3)  # Ray's log monitor forwards worker lines about once a second
""")


def test_actor_warnings_reach_the_driver_and_info_does_not():
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=REPO)
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "stage warning: reference ref7.mp4 decoded fewer frames than expected" in out, out[-3000:]
    assert "stage info line" not in out, out[-3000:]
