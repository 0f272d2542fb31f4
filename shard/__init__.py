"""NE file -> shard set: one NE file per tensor-parallel rank + manifest.json."""
