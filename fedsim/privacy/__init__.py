"""Privacy: differential privacy mechanisms, their configuration and accounting."""
