"""The shipped configs, installed as package data (`pv_ray.configs`) so that the embedded default
of `pv-ray personalize` is found outside a source checkout too."""
