"""Presets that run offline: the tiny and tiny-prior model folders and the demo identities."""
