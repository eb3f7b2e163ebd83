"""The results page (pipelines/gallery.py) of a real batch run, opened in a real headless browser (Chromium from
the system packages; .ci/run installs it): no console errors, every preview image loads, a screenshot is kept."""

import os
import shutil
import subprocess

import pytest
from conftest import save_model_for, write_clips

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(REPO, "outputs", "test-artifacts")
GEN = dict(num_frames=9, height=32, width=32, steps=2, guidance_scale=6.0)
# after load: count images that decoded, mark the body (read back from the dumped DOM)
CHECK = """<script>window.addEventListener("load", () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-images", imgs.length + "/" + ok);
});</script>"""


def chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.fixture(scope="module")
def browser():
    path = chromium()
    if path is None:
        if os.environ.get("VIDEO2LORA_REQUIRE_BROWSER"):  # CI installs it: missing there is a failure
            pytest.fail("no Chromium on PATH (.ci/run installs the system package)")
        pytest.skip("no Chromium on PATH (apt install chromium)")
    return path


def run_browser(path, url, *flags):
    cmd = [path, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--enable-logging=stderr", "--log-level=0", "--allow-file-access-from-files", *flags, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_gallery_page_loads_clean_in_a_browser(browser, tiny_backbone_dir, tmp_path):
    import ray

    from pipelines.batch import run_batch_job
    from pipelines.config import BatchJobConfig
    from pipelines.gallery import write_gallery
    from video2lora.config import GenerationConfig

    os.environ["RAY_AUTH_MODE"] = "disabled"
    refs = write_clips(tmp_path, 2, seed=3)
    (tmp_path / "corrupt.mp4").write_bytes(b"not a video" * 30)
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"sample_id": "ok_a", "reference_uri": refs[0], "prompt": "a red <b>circle</b>", "seed": 1},
            {"sample_id": "mix", "reference_uris": refs, "reference_weights": [0.7, 0.3], "prompt": "a mix", "seed": 2},
            {"sample_id": "broken", "reference_uri": str(tmp_path / "corrupt.mp4"), "prompt": "x"}]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), tmp_path / "m.parquet")
    out = tmp_path / "out"
    cfg = BatchJobConfig(backbone=tiny_backbone_dir, checkpoint=save_model_for(tiny_backbone_dir, str(tmp_path / "ck")),
                         output=str(out), generation=GenerationConfig(**GEN), actor_num_cpus=0.25, decode_num_cpus=0.25)
    ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=False)
    try:
        run_batch_job(str(tmp_path / "m.parquet"), cfg, progress=False)
        page = write_gallery(str(out))
    finally:
        ray.shutdown()
    text = open(page).read()
    assert text.index("broken") < text.index("ok_a")  # failed rows first
    assert "&lt;b&gt;circle&lt;/b&gt;" in text and "<b>circle" not in text  # prompts are escaped
    assert "x 0.7" in text and "x 0.3" in text  # the mix's weights
    assert sorted(os.listdir(out / "gallery")) == ["mix.out.gif", "mix.ref0.gif", "mix.ref1.gif", "ok_a.out.gif",
                                                    "ok_a.ref0.gif"]
    checked = tmp_path / "checked.html"  # the page in place (its relative previews), plus the load check
    checked.write_text(text.replace("</body>", CHECK + "</body>"))
    shutil.copy(checked, out / "checked.html")
    url = f"file://{out / 'checked.html'}"
    dom = run_browser(browser, url, "--virtual-time-budget=5000", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-images="5/5"' in dom.stdout, dom.stdout[-1500:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    os.makedirs(ARTIFACTS, exist_ok=True)
    shot = os.path.join(ARTIFACTS, "gallery.png")
    r = run_browser(browser, url, "--virtual-time-budget=5000", "--window-size=1200,700", f"--screenshot={shot}")
    assert r.returncode == 0 and os.path.getsize(shot) > 10_000, r.stderr[-2000:]
