"""Where triplets land and how they are read back: the Parquet contract (schema), rows built from
annotations (encode), atomic shards and their writer (shards), the output folder with its lock and
journal (output), the reader, and the run manifest."""
