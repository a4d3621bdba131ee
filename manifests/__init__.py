"""Built-in dataset manifests (YAML); read with ``disco.pipeline.sources.dataset_manifest``."""
