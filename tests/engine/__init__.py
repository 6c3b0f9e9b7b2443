"""The engine's tests: statistics, approximations against the dense Gauss-Newton oracle, scoring, sharding, memory."""
