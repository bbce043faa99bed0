"""The model layer: the frozen text-to-video backbone, the spatial identity adapter, sampling."""
