"""Side-by-side performance ratios: each benchmark runs the service and the library it wraps in one run."""
