"""Built-in environments and adapters, one file each (registered by `safactory.sim.registry`)."""
