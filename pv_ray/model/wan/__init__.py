"""Wan 2.1 / 2.2 (DiT, flow matching) as a `VideoBackbone`."""
