"""numpy + MPI tensor-parallel runtime: load a rank's shard, generate, verify."""
