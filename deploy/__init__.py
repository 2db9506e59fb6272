"""Standing bridgepool up: the CLI, the local launcher, compose and network-namespace deployments."""
