"""The federation: one engine (`engine`) for simulation and deployment, one strategy (`strategy`), the
transports behind a registry (`transports`: plain, he, secagg; their config half in `transport_specs`), the CKKS
key holder's process (`keyholder`), round checkpoints (`checkpoint`) and why a run stops (`errors`). A hospital's
round and the Message-API ClientApp are `node`; every hospital's entry point, in simulation and deployment, is
`secure_fedkim.hospital.client_app.app`."""
