"""CPU-only backends that flaxres.ops selects inside the traced program."""
