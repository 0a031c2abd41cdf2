"""Each stage is a module with `run(config)`: set up, loop, save — readable top to bottom."""
