"""Where triplets land and how they are read back: the Parquet contract (schema), rows built from
annotations (encode), the shard writer and its journal (writer), the reader, and the run manifest."""
