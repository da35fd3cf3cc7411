"""`he`: hospitals send only signed CKKS ciphertexts; a separate key holder decrypts only their sum.

The server process sums ciphertexts with the public context alone (`privacy.he.Aggregator`); the key
holder (`secure_fedkim.federation.keyholder`, its own process) holds the secret key, checks the
contributions' signatures and its policy, and releases the noise-flooded weighted mean once per round.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord

from secure_fedkim.federation.errors import RoundFailed
from secure_fedkim.federation.transport_specs import CKKSSpec
from secure_fedkim.federation.transports.base import Transport
from secure_fedkim.rundir.layout import RunDir, public_key_file


def registered_keys(run_dir: Path, clients: list[str], direct: bool = False) -> dict[str, bytes]:
    """The hospitals' public signing keys, as registered when they joined (run_dir/keys/<hospital>.pub,
    or <run_dir>/<hospital>.pub with `direct`, for a keys directory kept elsewhere)."""
    keys = {}
    for c in clients:
        path = public_key_file(run_dir, c) if direct else RunDir(run_dir).public_key(c)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: hospital {c!r} has no registered signing key")
        keys[c] = path.read_bytes()
    return keys


class CKKSTransport(Transport):
    spec = CKKSSpec
    server_sees = "ciphertexts only; the key holder sees only the noise-flooded sum"
    signs_updates = True
    update_held_as = "CKKS ciphertexts it cannot decrypt"
    report_mode = "ckks"
    title = "CKKS homomorphic encryption"
    update_form = "CKKS ciphertext, signed (Ed25519)"
    report_checks = ("he_parameters", "server_secret_key")
    report_section = "ckks"
    protects_one_update = "CKKS encryption; the server holds a public-only context and never the secret key"
    exposes_one_update = ("a malicious server can have one hospital's update decrypted: the key holder checks that an "
                          "'aggregate' lists at least min_clients hospitals' signed contributions, not that its ciphertext "
                          "is their sum, so one hospital's ciphertext handed in with the others' signatures is decrypted "
                          "(SecAgg+ mode answers that); collusion with the key holder reveals every update")
    summary_sentence = ("Updates reached the server only as CKKS ciphertexts; a separate key holder decrypted only "
                        "aggregates that listed several hospitals' signed contributions, which a server that follows the "
                        "protocol sends as their sum (encryption, not differential privacy).")
    not_covered = "a server colluding with the CKKS key holder (encryption is confidentiality, not DP)"
    parties = (("CKKS key holder", "a separate process that alone holds the secret key and decrypts, once per round, "
                "only an aggregate that lists at least min_clients hospitals' signed contributions"),)
    threats = (("CKKS key holder", "one hospital's update", "it decrypts only aggregates that list at least min_clients "
                "signed contributions, once per round, with noise flooding", "collusion with the server (assumed absent)"),)

    def __init__(self, cfg, keyholder=None, verify_keys: dict[str, bytes] | None = None):
        """`keyholder` / `verify_keys`: an already started key holder (tests); otherwise `open` starts one."""
        super().__init__(cfg)
        self.keyholder, self.verify_keys = keyholder, verify_keys
        self._owns_keyholder = False

    def reply(self, model_state, num_examples, config, home, client):
        from privacy.he import encrypt_update
        from secure_fedkim.federation.aggregation import flatten_state
        from secure_fedkim.deploy.identity import load_signing_key

        update = encrypt_update(
            flatten_state(model_state), num_examples, bytes(config["he-public-context"]), load_signing_key(home),
            run_id=str(config["run-id"]), round=int(config["server-round"]), client=client,
        )
        return {"he": ConfigRecord({"update": update.to_bytes()})}  # only ciphertext leaves the hospital

    def open(self, run_dir, keys_dir):
        from secure_fedkim.federation.keyholder import KeyHolderProcess

        fed = self.cfg.federation
        self.verify_keys = registered_keys(keys_dir or RunDir(run_dir).keys_dir, fed.clients, direct=True)
        self.keyholder = KeyHolderProcess(run_dir, self.verify_keys, Path(run_dir).name, fed.min_clients, fed.he.flooding_sigma)
        self._owns_keyholder = True
        return {"he-public-context": self.keyholder.public_context}

    def close(self):
        if self._owns_keyholder and self.keyholder is not None:
            self.keyholder.close()

    def aggregate(self, strategy, server_round, contributions):
        """Sum the ciphertexts here (public context only); the key holder decrypts the mean, once."""
        from privacy.he import Aggregator, HEPayloadError, InsufficientContributionsError

        aggregator = Aggregator(
            self.keyholder.public_context, self.verify_keys, strategy.run_dir.name, server_round,
            self.cfg.federation.min_clients,
        )
        rejected = {}
        for client, _, content in contributions:
            try:
                aggregator.add(bytes(content.config_records["he"]["update"]))
            except HEPayloadError as e:  # the round goes on with the others if min_clients still holds
                rejected[client] = str(e)
        strategy.round_stats["rejected"] = rejected
        try:
            encrypted = aggregator.aggregate()
        except InsufficientContributionsError as e:
            raise RoundFailed(f"round {server_round}: {e}; rejected: {rejected}") from None
        return self.keyholder.decrypt(encrypted.to_bytes()).astype(np.float32)

    def facts(self):
        return {"mode": self.name, **({"ckks": self.keyholder.parameters} if self.keyholder is not None else {})}

    def report_evidence(self, run, out, findings):
        """Key custody from the key holder's own ledger, and the CKKS parameters (`he_evidence`)."""
        from secure_fedkim.federation.transports.he_evidence import ckks_evidence  # the report's types, only for a report

        ckks_evidence(run, out, findings)
