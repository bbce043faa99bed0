"""`python -m pv_ray` is the `pv-ray` command."""

from pv_ray.cli import main

main()
