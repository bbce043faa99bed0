"""Ray job entrypoint: `ray job submit -- python jobs/evaluate.py --store ... [--identities a,b]`.

Takes the same arguments as `pv-ray evaluate`.
"""

import sys

from pv_ray.cli import app

if __name__ == "__main__":
    sys.exit(app(["evaluate", *sys.argv[1:]]))
