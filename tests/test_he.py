"""CKKS aggregation roles (privacy.he): correctness, key separation, payload rejection, decryption policy,
noise flooding, dropout, sealed secret export. Small vectors (5k values) keep this fast."""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest
import tenseal as ts

from privacy import he, keys

N_VALUES = 5_000
RUN = "run-42"
ROUND = 3
SIGMA = he.DEFAULT_FLOODING_SIGMA


@pytest.fixture(scope="module")
def fed():
    """One key holder, four clients with updates, sample-count weights and signing keys."""
    rng = np.random.default_rng(7)
    clients = [f"hospital-{c}" for c in "abcd"]
    sks = {c: keys.generate_signing_key() for c in clients}
    vks = {c: keys.public_key_bytes(k) for c, k in sks.items()}
    updates = {c: rng.normal(0.0, 0.05, N_VALUES).astype(np.float32) for c in clients}
    weights = {"hospital-a": 120.0, "hospital-b": 800.0, "hospital-c": 45.0, "hospital-d": 300.0}
    ledger: list[dict] = []
    kh = he.KeyHolder(he.CKKSParams(), 3, SIGMA, lambda **e: ledger.append(e), client_verify_keys=vks, run_id=RUN)
    public = kh.public_context()
    payloads = {
        c: he.encrypt_update(updates[c], weights[c], public, sks[c], run_id=RUN, round=ROUND, client=c).to_bytes()
        for c in clients
    }
    return dict(clients=clients, sks=sks, vks=vks, updates=updates, weights=weights, kh=kh, public=public,
                payloads=payloads, ledger=ledger)


def weighted_mean(fed, clients):
    w = sum(fed["weights"][c] for c in clients)
    return sum(fed["weights"][c] * fed["updates"][c].astype(np.float64) for c in clients) / w


def new_aggregator(fed, round=ROUND, min_clients=3):
    return he.Aggregator(fed["public"], fed["vks"], run_id=RUN, round=round, min_clients=min_clients)


def fresh_key_holder(fed, min_clients=3, sigma=SIGMA, ledger=None):
    """A separate key holder (own context) with the fixture's clients registered, plus payload maker."""
    kh = he.KeyHolder(he.CKKSParams(), min_clients, sigma, ledger, client_verify_keys=fed["vks"], run_id=RUN)
    pub = kh.public_context()

    def payload(c, round=ROUND):
        return he.encrypt_update(fed["updates"][c], fed["weights"][c], pub, fed["sks"][c],
                                 run_id=RUN, round=round, client=c).to_bytes()

    return kh, pub, payload


def secret_context_of(kh):
    """The key holder's secret context, obtained the only way it leaves: sealed to our X25519 key."""
    me = keys.generate_transport_key()
    return ts.context_from(keys.open_sealed(me, kh.export_secret_for(me.public_key()), he.HE_SECRET_INFO))


def secret_key_material(ctx, tmp_path):
    """Serialized SEAL secret key and raw little-endian NTT coefficients of it (for byte searches)."""
    path = str(tmp_path / "sk.bin")
    ctx.secret_key().data.save(path)
    serialized = open(path, "rb").read()
    pt = ctx.secret_key().data.data()
    raw = b"".join(struct.pack("<Q", pt.data(i)) for i in range(0, 64))
    return serialized, raw


# ------------------------------------------------------------------------------------- parameters
def test_default_params_meet_128_bit_table_and_describe():
    p = he.CKKSParams()
    assert p.security_bits == 128
    assert p.total_modulus_bits <= he.SECURITY_TABLE_128[p.poly_modulus_degree]
    d = p.describe()
    for k in ("poly_modulus_degree", "coeff_mod_bit_sizes", "global_scale", "security_level", "ciphertext_expansion"):
        assert k in d
    assert d["poly_modulus_degree"] == 4096 and d["coeff_mod_bit_sizes"] == [60, 40]
    assert d["ciphertext_expansion"] == 4.0
    assert he.CKKSParams(8192, (60, 40, 40, 60), 40).security_bits == 128  # 200 <= 218


@pytest.mark.parametrize(
    "n,bits",
    [(4096, (60, 50)), (2048, (30, 30)), (8192, (60, 60, 60, 60)), (1024, (27, 20))],
)
def test_params_over_the_128_bit_table_raise(n, bits):
    with pytest.raises(ValueError, match="128-bit"):
        he.CKKSParams(n, bits, 20)


def test_params_reject_bad_shapes():
    with pytest.raises(ValueError):
        he.CKKSParams(3000, (60, 40), 36)
    with pytest.raises(ValueError):
        he.CKKSParams(4096, (60,), 36)  # TenSEAL needs a special prime
    with pytest.raises(ValueError):
        he.CKKSParams(4096, (40, 40), 36)  # no value range left above the scale


# ------------------------------------------------------------------------------- correctness
def test_aggregate_equals_plaintext_weighted_mean(fed, tmp_path):
    kh, pub, payload = fresh_key_holder(fed)
    agg = he.Aggregator(pub, fed["vks"], run_id=RUN, round=ROUND, min_clients=3)
    for c in fed["clients"]:
        agg.add(payload(c))
    aggregate = agg.aggregate()
    assert aggregate.clients == fed["clients"]
    assert aggregate.total_weight == sum(fed["weights"].values())
    exact = weighted_mean(fed, fed["clients"])
    raw = he._decrypt_sum(secret_context_of(kh), aggregate) / aggregate.total_weight
    assert np.max(np.abs(raw - exact)) < 1e-7  # CKKS error, before flooding
    released = kh.decrypt_aggregate(aggregate.to_bytes())
    assert released.shape == (N_VALUES,)
    # flooding N(0, 1e-5^2) on 5k values: max |noise| ~ 4 sigma; 8 sigma tolerance
    assert np.max(np.abs(released - exact)) < 8 * SIGMA
    # an unweighted mean is far off: the test can tell weighting apart
    unweighted = np.mean([fed["updates"][c] for c in fed["clients"]], axis=0)
    assert np.max(np.abs(unweighted - exact)) > 100 * SIGMA


def test_dense_packing_and_expansion(fed):
    kh = fed["kh"]
    sk = fed["sks"]["hospital-a"]
    u = np.ones(8192, np.float32)
    upd = he.encrypt_update(u, 1.0, fed["public"], sk, run_id=RUN, round=ROUND, client="hospital-a")
    assert len(upd.chunks) == 2  # 4096 values per ciphertext, not one ciphertext per value
    assert upd.ciphertext_nbytes / u.nbytes <= 4.1
    assert len(upd.to_bytes()) / u.nbytes <= 8
    assert he.EncryptedUpdate.from_bytes(upd.to_bytes()) == upd
    assert kh.describe()["flooding_sigma"] == SIGMA


def test_client_dropping_leaves_correct_aggregate_of_the_others(fed):
    kh, pub, payload = fresh_key_holder(fed)
    agg = he.Aggregator(pub, fed["vks"], run_id=RUN, round=ROUND, min_clients=3)
    present = ["hospital-a", "hospital-b", "hospital-d"]  # hospital-c never sends
    for c in present:
        agg.add(payload(c))
    aggregate = agg.aggregate()
    assert aggregate.clients == present
    released = kh.decrypt_aggregate(aggregate)
    assert np.max(np.abs(released - weighted_mean(fed, present))) < 8 * SIGMA
    assert np.max(np.abs(released - weighted_mean(fed, fed["clients"]))) > 100 * SIGMA


# ------------------------------------------------------------------------------ key separation
def test_aggregator_context_is_public_and_cannot_decrypt(fed):
    agg = new_aggregator(fed)
    ctx = agg.context
    assert not ctx.has_secret_key() and not ctx.is_private() and ctx.is_public()
    assert not ctx.has_relin_keys() and not ctx.has_galois_keys()
    with pytest.raises(ValueError):
        ctx.secret_key()
    with pytest.raises(ValueError):
        ctx.decryptor()
    for c in fed["clients"][:3]:
        agg.add(fed["payloads"][c])
    with pytest.raises(ValueError):
        he._decrypt_sum(ctx, agg.aggregate())
    with pytest.raises(ValueError):
        ts.ckks_vector(ctx, [1.0, 2.0]).decrypt()


def test_aggregator_and_clients_refuse_a_private_context(fed):
    private = fed["kh"]._ctx.serialize(save_secret_key=True)
    with pytest.raises(ValueError, match="secret key"):
        he.Aggregator(private, fed["vks"], RUN, ROUND, 3)
    with pytest.raises(ValueError, match="secret key"):
        he.encrypt_update(np.ones(10), 1.0, private, fed["sks"]["hospital-a"], run_id=RUN, round=ROUND,
                          client="hospital-a")


def test_no_secret_key_or_plaintext_in_any_bytes_the_aggregator_handles(fed, tmp_path):
    kh = fed["kh"]
    serialized_sk, raw_sk = secret_key_material(kh._ctx, tmp_path)
    # positive control: the search finds the key where it really is
    assert serialized_sk in kh._ctx.serialize(save_secret_key=True)
    agg = new_aggregator(fed)
    for c in fed["clients"]:
        agg.add(fed["payloads"][c])
    handled = [fed["public"], *fed["payloads"].values(), agg.aggregate().to_bytes()]
    sk_needles = [serialized_sk, raw_sk] + [serialized_sk[i : i + 32] for i in range(16, len(serialized_sk) - 32, 4096)]
    sk_needles += [raw_sk[i : i + 24] for i in range(0, len(raw_sk) - 24, 64)]
    for c in fed["clients"]:
        u = fed["updates"][c]
        u32 = u.tobytes()
        u64 = (u.astype(np.float64) * fed["weights"][c]).tobytes()
        plain_needles = [u32, u64] + [u32[i : i + 32] for i in range(0, len(u32) - 32, 997 * 4)]
        plain_needles += [u.astype(np.float64).tobytes()[i : i + 32] for i in range(0, 8 * N_VALUES - 32, 1499 * 8)]
        plain_needles += [u64[i : i + 32] for i in range(0, len(u64) - 32, 1499 * 8)]
        for blob in handled:
            for needle in sk_needles + plain_needles:
                assert needle not in blob


# ------------------------------------------------------------------------------ rejections
def flip(data: bytes, pos: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1 :]


def test_each_bad_payload_is_rejected_with_its_own_error_and_the_round_goes_on(fed):
    kh, pub, payload = fresh_key_holder(fed)
    agg = he.Aggregator(pub, fed["vks"], run_id=RUN, round=ROUND, min_clients=3)
    good = {c: payload(c) for c in fed["clients"]}

    # tampered: one ciphertext byte flipped
    with pytest.raises(he.TamperedPayloadError, match="hospital-a") as e:
        agg.add(flip(good["hospital-a"], len(good["hospital-a"]) - 1000))
    assert type(e.value) is he.TamperedPayloadError and "signature" in str(e.value)
    # tampered metadata: a larger weight claimed
    upd = he.EncryptedUpdate.from_bytes(good["hospital-a"])
    with pytest.raises(he.TamperedPayloadError, match="hospital-a"):
        agg.add(dataclasses.replace(upd, weight=upd.weight * 10).to_bytes())
    # reordered ciphertext chunks
    with pytest.raises(he.TamperedPayloadError, match="hospital-a"):
        agg.add(dataclasses.replace(upd, chunks=upd.chunks[::-1]).to_bytes())
    # truncated
    with pytest.raises(he.TruncatedPayloadError, match="hospital-b") as e:
        agg.add(good["hospital-b"][:-4000])
    assert "truncated" in str(e.value)
    # foreign: validly signed for another run
    other_run = he.encrypt_update(fed["updates"]["hospital-c"], 1.0, pub, fed["sks"]["hospital-c"],
                                  run_id="another-run", round=ROUND, client="hospital-c").to_bytes()
    with pytest.raises(he.ForeignPayloadError, match="hospital-c") as e:
        agg.add(other_run)
    assert "run" in str(e.value)
    # foreign: encrypted under another key holder's context (same parameters, other keys)
    with pytest.raises(he.ForeignPayloadError, match="hospital-c") as e:
        agg.add(fed["payloads"]["hospital-c"])
    assert "context" in str(e.value)
    # replayed: a payload of an earlier round
    with pytest.raises(he.ReplayedPayloadError, match="hospital-d") as e:
        agg.add(payload("hospital-d", round=ROUND - 1))
    assert "earlier round" in str(e.value)
    # unknown sender
    stranger = keys.generate_signing_key()
    forged = he.encrypt_update(fed["updates"]["hospital-d"], 1.0, pub, stranger, run_id=RUN, round=ROUND,
                               client="mallory").to_bytes()
    with pytest.raises(he.UnknownClientError, match="mallory"):
        agg.add(forged)
    # a stranger signing in an enrolled client's name
    impostor = he.encrypt_update(fed["updates"]["hospital-d"], 1.0, pub, stranger, run_id=RUN, round=ROUND,
                                 client="hospital-d").to_bytes()
    with pytest.raises(he.TamperedPayloadError, match="hospital-d"):
        agg.add(impostor)
    assert agg.accepted_clients == []

    # the round goes on with the good payloads; a second copy of one is a replay
    for c in ["hospital-a", "hospital-b", "hospital-d"]:
        agg.add(good[c])
    with pytest.raises(he.ReplayedPayloadError, match="hospital-b") as e:
        agg.add(good["hospital-b"])
    assert "already contributed" in str(e.value)
    assert set(agg.rejected) >= {"hospital-a", "hospital-b", "hospital-c", "hospital-d", "mallory"}
    released = kh.decrypt_aggregate(agg.aggregate())
    present = ["hospital-a", "hospital-b", "hospital-d"]
    assert np.max(np.abs(released - weighted_mean(fed, present))) < 8 * SIGMA
    # all error classes are distinct ValueErrors
    classes = [he.TamperedPayloadError, he.TruncatedPayloadError, he.ForeignPayloadError,
               he.ReplayedPayloadError, he.UnknownClientError]
    assert len(set(classes)) == 5 and all(issubclass(c, ValueError) for c in classes)


def test_truncated_inside_header_and_garbage(fed):
    agg = new_aggregator(fed)
    with pytest.raises(he.TruncatedPayloadError):
        agg.add(fed["payloads"]["hospital-a"][:30])
    with pytest.raises(he.MalformedPayloadError):
        agg.add(b"definitely not a payload")
    with pytest.raises(he.MalformedPayloadError, match="hospital-a"):
        agg.add(fed["payloads"]["hospital-a"] + b"\x00")


def test_aggregate_needs_min_clients(fed):
    agg = new_aggregator(fed, min_clients=3)
    agg.add(fed["payloads"]["hospital-a"])
    agg.add(fed["payloads"]["hospital-b"])
    with pytest.raises(he.InsufficientContributionsError, match="at least 3"):
        agg.aggregate()
    with pytest.raises(ValueError):
        new_aggregator(fed, min_clients=1)


def test_encrypt_update_input_checks(fed):
    sk, pub = fed["sks"]["hospital-a"], fed["public"]
    kw = dict(run_id=RUN, round=ROUND, client="hospital-a")
    with pytest.raises(ValueError, match="non-finite"):
        he.encrypt_update(np.array([1.0, np.nan]), 1.0, pub, sk, **kw)
    with pytest.raises(ValueError, match="weight"):
        he.encrypt_update(np.ones(4), 0.0, pub, sk, **kw)
    with pytest.raises(ValueError, match="wrapping|wrap"):
        he.encrypt_update(np.ones(4), 1e7, pub, sk, **kw)
    with pytest.raises(ValueError, match="empty"):
        he.encrypt_update(np.ones(0), 1.0, pub, sk, **kw)


# --------------------------------------------------------------------------- key holder policy
def test_key_holder_decrypts_once_per_round_and_records_ledger(fed):
    ledger: list[dict] = []
    kh, pub, payload = fresh_key_holder(fed, ledger=lambda **e: ledger.append(e))
    agg = he.Aggregator(pub, fed["vks"], run_id=RUN, round=ROUND, min_clients=3)
    for c in fed["clients"][:3]:
        agg.add(payload(c))
    aggregate = agg.aggregate()
    kh.decrypt_aggregate(aggregate)
    assert ledger == [dict(event="he_decrypt", round=ROUND, clients=fed["clients"][:3], n_values=N_VALUES,
                           flooding_sigma=SIGMA)]
    with pytest.raises(he.DecryptionRefused, match="already decrypted"):
        kh.decrypt_aggregate(aggregate)
    # an older round is refused too
    agg_old = he.Aggregator(pub, fed["vks"], run_id=RUN, round=ROUND - 1, min_clients=3)
    for c in fed["clients"][:3]:
        agg_old.add(payload(c, round=ROUND - 1))
    with pytest.raises(he.DecryptionRefused, match="older"):
        kh.decrypt_aggregate(agg_old.aggregate())
    assert len(ledger) == 1  # refusals are not decryptions
    # the next round decrypts
    agg_next = he.Aggregator(pub, fed["vks"], run_id=RUN, round=ROUND + 1, min_clients=3)
    for c in fed["clients"][:3]:
        agg_next.add(payload(c, round=ROUND + 1))
    kh.decrypt_aggregate(agg_next.aggregate())
    assert [e["round"] for e in ledger] == [ROUND, ROUND + 1]


def test_key_holder_refuses_bad_declarations(fed):
    kh, pub, payload = fresh_key_holder(fed)
    agg = he.Aggregator(pub, fed["vks"], run_id=RUN, round=ROUND, min_clients=3)
    for c in fed["clients"]:
        agg.add(payload(c))
    good = agg.aggregate()
    c0 = good.contributions
    # fewer than min_clients declared (e.g. one client's ciphertext passed off as a sum)
    with pytest.raises(he.DecryptionRefused, match="requires >= 3"):
        kh.decrypt_aggregate(dataclasses.replace(good, contributions=c0[:2]))
    # padding the declaration with a duplicate
    with pytest.raises(he.DecryptionRefused, match="twice"):
        kh.decrypt_aggregate(dataclasses.replace(good, contributions=(c0[0], c0[0], c0[1])))
    # an inflated weight breaks its signature
    bad = dataclasses.replace(c0[1], weight=c0[1].weight * 2)
    with pytest.raises(he.DecryptionRefused, match="signature"):
        kh.decrypt_aggregate(dataclasses.replace(good, contributions=(c0[0], bad, *c0[2:])))
    # signatures are bound to the round
    with pytest.raises(he.DecryptionRefused, match="signature"):
        kh.decrypt_aggregate(dataclasses.replace(good, round=ROUND + 5))
    # unknown client
    ghost = dataclasses.replace(c0[0], client="ghost")
    with pytest.raises(he.DecryptionRefused, match="unregistered"):
        kh.decrypt_aggregate(dataclasses.replace(good, contributions=(ghost, *c0[1:])))
    # another context
    with pytest.raises(he.DecryptionRefused, match="context"):
        fed["kh"].decrypt_aggregate(good)
    # another run
    with pytest.raises(he.DecryptionRefused, match="run"):
        kh.decrypt_aggregate(dataclasses.replace(good, run_id="other"))
    # without registered verify keys nothing is decrypted
    unkeyed = he.KeyHolder(he.CKKSParams(), 3, SIGMA)
    with pytest.raises(he.DecryptionRefused, match="verify keys"):
        unkeyed.decrypt_aggregate(dataclasses.replace(good, context_id=unkeyed.context_id))
    # none of the refusals used up the round
    released = kh.decrypt_aggregate(good)
    assert np.max(np.abs(released - weighted_mean(fed, fed["clients"]))) < 8 * SIGMA


def test_key_holder_rejects_unsafe_settings():
    with pytest.raises(ValueError, match="min_clients"):
        he.KeyHolder(he.CKKSParams(), 1, SIGMA)
    with pytest.raises(ValueError, match="Li-Micciancio"):
        he.KeyHolder(he.CKKSParams(), 2, 0.0)


# ------------------------------------------------------------------------------ noise flooding
@pytest.mark.parametrize("sigma", [SIGMA, 1e-3])
def test_released_values_are_noise_flooded(fed, sigma):
    kh, pub, payload = fresh_key_holder(fed, sigma=sigma)
    agg = he.Aggregator(pub, fed["vks"], run_id=RUN, round=ROUND, min_clients=3)
    for c in fed["clients"]:
        agg.add(payload(c))
    aggregate = agg.aggregate()
    raw = he._decrypt_sum(secret_context_of(kh), aggregate) / aggregate.total_weight
    released = kh.decrypt_aggregate(aggregate)
    noise = released - raw
    # std of the flooding within 10% of the stated sigma (5k samples: sampling error ~1%)
    assert abs(np.std(noise) / sigma - 1) < 0.1
    assert abs(np.mean(noise)) < 5 * sigma / np.sqrt(N_VALUES)
    # flooding is far above the CKKS error it hides
    exact = weighted_mean(fed, fed["clients"])
    assert np.max(np.abs(raw - exact)) < sigma / 100
    assert np.max(np.abs(released - exact)) < 8 * sigma


# --------------------------------------------------------------------------- secret key export
def test_secret_key_is_exported_only_sealed(fed, tmp_path):
    kh = fed["kh"]
    serialized_sk, raw_sk = secret_key_material(kh._ctx, tmp_path)
    assert serialized_sk not in kh.public_context()
    replica_key = keys.generate_transport_key()
    sealed = kh.export_secret_for(replica_key.public_key())
    assert serialized_sk not in sealed and raw_sk not in sealed
    assert all(serialized_sk[i : i + 32] not in sealed for i in range(16, len(serialized_sk) - 32, 2048))
    with pytest.raises(keys.SealedBoxError, match="different recipient key"):
        he.KeyHolder.from_sealed_secret(sealed, keys.generate_transport_key(), he.CKKSParams(), 3)
    replica = he.KeyHolder.from_sealed_secret(sealed, replica_key, he.CKKSParams(), 3,
                                              client_verify_keys=fed["vks"], run_id=RUN)
    assert replica.context_id == kh.context_id
    agg = new_aggregator(fed, round=ROUND + 10)
    for c in fed["clients"][:3]:
        agg.add(he.encrypt_update(fed["updates"][c], fed["weights"][c], replica.public_context(), fed["sks"][c],
                                  run_id=RUN, round=ROUND + 10, client=c).to_bytes())
    released = replica.decrypt_aggregate(agg.aggregate())
    assert np.max(np.abs(released - weighted_mean(fed, fed["clients"][:3]))) < 8 * SIGMA
