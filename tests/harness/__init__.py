"""Real components for the tests: redis-server, model server, S3/GCS servers, a Kubernetes control plane."""
