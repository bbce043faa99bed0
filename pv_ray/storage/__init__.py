"""Storage: the adapter store, MLflow tracking, video files, identity ids and input folders."""
