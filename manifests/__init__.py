"""Built-in dataset manifests (YAML); read with ``disco.pipeline.manifest_yaml``."""
