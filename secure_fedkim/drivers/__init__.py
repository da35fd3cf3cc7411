"""The drivers: what starts a federation and writes its run directory.

`run` (Flower's simulation engine on this machine), `deploy_app` (the ServerApp and ClientApp
the deployment engine loads) and `study` (the same federation once per variant and seed)."""
