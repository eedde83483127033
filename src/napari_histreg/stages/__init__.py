"""Pipeline stages: each a function with arrays in, arrays out, and a small config dataclass."""
