"""Ray job entrypoint: `ray job submit -- python jobs/personalize.py [--config ...] [--input ...] ...`.

Takes the same arguments as `pv-ray personalize`; connects to the cluster the job runs on.
"""

import sys

from pv_ray.cli import app

if __name__ == "__main__":
    sys.exit(app(["personalize", *sys.argv[1:]]))
