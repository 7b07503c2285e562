"""Checks a job passes before it starts: preflight (paths, inputs, address) and resume validity."""
