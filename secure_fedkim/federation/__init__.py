"""The federation: one engine (`engine`) for simulation and deployment, one strategy (`strategy`), the
transports behind a registry (`transports`: plain, he, secagg), the CKKS key holder's process
(`keyholder`) and round checkpoints (`checkpoint`). The hospital's node is `secure_fedkim.client_app`."""
