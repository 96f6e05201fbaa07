"""Work done out of the request path, in subprocesses: compression jobs."""
