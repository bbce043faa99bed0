"""The Ray layer (with `serving/`, the only code that imports Ray): ingest on Ray Data and the
batch job on Ray Train. Everything below it runs without a cluster."""
