"""What the tests run in other processes: each ``torch.distributed`` rank (spawned, so it imports
its function by name), and the scripts that run JAX's shards and TensorFlow's replicas in a
process of their own (each sets up its devices before the framework is imported)."""
