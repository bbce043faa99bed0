"""Faces: reference analysis (insightface), ArcFace alignment, the differentiable recogniser,
and the tiny insightface-format pack."""
