"""The control plane: a config becomes a Serve application (builder.py), a service is started, watched
until ready and stopped with everything it started (service.py), and a config the cluster cannot hold is
refused before deploying (capacity.py)."""
