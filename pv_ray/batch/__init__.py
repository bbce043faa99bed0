"""The batch job without Ray: analysed identity rows and one tuning worker's recipe.
`pv_ray.cluster` wires Ray Data and Ray Train to them."""
