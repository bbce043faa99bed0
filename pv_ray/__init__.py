"""pv-ray: PersonalVideo identity customization of a text-to-video model, on Ray."""

__version__ = "0.1.0"
