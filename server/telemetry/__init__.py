"""What the gateway measures about its engines off the request path: live load, latency profiles."""
