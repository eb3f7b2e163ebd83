"""A results page for a batch run: OUTPUT/index.html with an animated preview per row (reference, generated video),
prompt, weights, status or error and stage timings; failed rows first, a filter by status.

    python jobs/gallery.py outputs/batch          # or s3://bucket/run1; previews are Ray CPU tasks

The batch job writes the same page with --gallery.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.common import init_ray  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", nargs="?", default="outputs/batch", help="the batch job's --output (local or s3://)")
    p.add_argument("--ray-address", default=None, help="default: the cluster of `ray job submit`, else a local one")
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from pipelines.gallery import write_gallery
    from video2lora.storage import exists, join

    if not exists(join(a.output, "results.parquet")):
        print(f"error: {a.output} has no results.parquet: is it a batch job's --output?", file=sys.stderr)
        return 2
    init_ray(a.ray_address)
    print(f"gallery: {write_gallery(a.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
