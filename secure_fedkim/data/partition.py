"""Persistent splits of one task: the server's labelled public split, a test split, and client shards.

`partition_task` is a pure function of (data labels/sites/groups, clients, scheme, alpha, fractions, seed):
the same call gives the same split in every process and every round. The unit of assignment is the
patient: when `data.group` is set, all records of a group go to one place (public, test or one client),
so no patient straddles splits; otherwise every record is its own unit.

1. public and test are drawn first, stratified by label, and by site too when the task has sites (so each
   hospital keeps its share of the test set). Per stratum, the quota is the stratum's share of
   round(fraction * N) (largest remainder); units are taken in a seeded random order while taking one brings
   the count closer to the quota. A stratum whose quota is > 0 but whose units are all too big gets its
   smallest unit anyway, as long as at least one unit of the stratum stays for the clients (so a test set
   has every label when groups allow it; e.g. an image task whose records are crops of
   a dozen source images).
2. the rest is split among the clients:
   - natural:   one client per distinct site; `clients` must be exactly the sorted distinct sites.
   - iid:       units in a seeded random order, each to the client with the fewest records so far (equal
                shards, sizes within one record when there are no groups).
   - dirichlet: per label, client proportions ~ Dirichlet(alpha, ..., alpha); a label's units (in seeded
                random order) are cut at those proportions. Small alpha = strong label skew. Every client
                must get at least min(DIRICHLET_MIN_RECORDS, rest // clients) records: up to
                DIRICHLET_MAX_DRAWS draws are tried; if none qualifies, the last draw is repaired by
                moving random units from the largest client to each client below the minimum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from secure_fedkim.data.formats import DataError, TaskData

SCHEMES = ("natural", "iid", "dirichlet")
DIRICHLET_MIN_RECORDS = 10
DIRICHLET_MAX_DRAWS = 100


@dataclass
class TaskSplit:
    task: str
    public: np.ndarray  # record indices of the server's labelled public split
    test: np.ndarray  # record indices never used for training
    clients: dict[str, np.ndarray]  # client name -> record indices of its persistent private shard


def partition_task(
    data: TaskData,
    clients: list[str],
    scheme: str = "iid",
    alpha: float = 0.5,
    public_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> TaskSplit:
    name = data.task
    clients = [str(c) for c in clients]
    if scheme not in SCHEMES:
        raise DataError(f"task {name!r}: unknown partition scheme {scheme!r}; expected one of {list(SCHEMES)}")
    if not clients or len(set(clients)) != len(clients):
        raise DataError(f"task {name!r}: clients must be a non-empty list of distinct names, got {clients}")
    if not (0 <= public_fraction < 1 and 0 <= test_fraction < 1 and public_fraction + test_fraction < 1):
        raise DataError(f"task {name!r}: public_fraction {public_fraction} and test_fraction {test_fraction} "
                        "must be >= 0 with a sum below 1")
    if scheme == "dirichlet" and not alpha > 0:
        raise DataError(f"task {name!r}: dirichlet alpha must be > 0, got {alpha}")
    if scheme == "natural":
        if data.site is None:
            raise DataError(f"task {name!r}: partition 'natural' needs a site per record, and this task has none; "
                            "use 'iid' or 'dirichlet'")
        sites = sorted(set(data.site.tolist()))
        if sorted(clients) != sites:
            raise DataError(f"task {name!r}: partition 'natural' needs one client per site: clients {clients} "
                            f"must be the sorted distinct sites {sites}")

    # units: patients (groups) or single records
    n = len(data)
    if data.group is not None:
        _, unit_of = np.unique(np.asarray(data.group).astype(str), return_inverse=True)
    else:
        unit_of = np.arange(n)
    n_units = int(unit_of.max()) + 1 if n else 0
    size = np.bincount(unit_of, minlength=n_units)
    pos = np.bincount(unit_of, weights=data.y, minlength=n_units)
    ulabel = (2 * pos >= size).astype(np.int64)  # majority label of the unit (ties: 1)
    usite = None
    if data.site is not None:
        usite = np.empty(n_units, dtype=object)
        order = np.argsort(unit_of, kind="stable")
        for u, recs in enumerate(np.split(order, np.cumsum(size)[:-1])):
            vals, counts = np.unique(data.site[recs].astype(str), return_counts=True)
            usite[u] = vals[np.argmax(counts)]  # a patient seen at several sites: the site of most records

    rng = np.random.default_rng(seed)
    keys = ulabel.astype(str) if usite is None else np.char.add(ulabel.astype(str) + "|", usite.astype(str))
    strata, stratum_of = np.unique(keys, return_inverse=True)
    free = np.ones(n_units, dtype=bool)
    test_u = _stratified_take(stratum_of, size, free, test_fraction, n, rng)
    free[test_u] = False
    public_u = _stratified_take(stratum_of, size, free, public_fraction, n, rng)
    free[public_u] = False
    rest = np.flatnonzero(free)

    if scheme == "natural":
        assign = {c: rest[usite[rest] == c] for c in clients}
    else:
        if len(rest) < len(clients):
            raise DataError(f"task {name!r}: {len(rest)} patients/records left after public and test cannot "
                            f"give {len(clients)} clients a shard each")
        if scheme == "iid":
            assign = _iid(rest, size, len(clients), rng)
        else:
            assign = _dirichlet(rest, size, ulabel, len(clients), alpha, rng)
        assign = {c: assign[i] for i, c in enumerate(clients)}

    records = _records_of(unit_of, n_units)
    return TaskSplit(
        task=name,
        public=_to_records(public_u, records),
        test=_to_records(test_u, records),
        clients={c: _to_records(assign[c], records) for c in clients},
    )


def _records_of(unit_of: np.ndarray, n_units: int) -> list[np.ndarray]:
    order = np.argsort(unit_of, kind="stable")
    return np.split(order, np.cumsum(np.bincount(unit_of, minlength=n_units))[:-1]) if n_units else []


def _to_records(units: np.ndarray, records: list[np.ndarray]) -> np.ndarray:
    if len(units) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate([records[u] for u in units])).astype(np.int64)


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    quota = weights * total / max(weights.sum(), 1)
    out = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - out), kind="stable")
    out[order[: total - out.sum()]] += 1
    return out


def _stratified_take(stratum_of, size, free, fraction, n, rng) -> np.ndarray:
    """Units (among `free`) making up about fraction * n records, with each stratum's share."""
    n_strata = int(stratum_of.max()) + 1 if len(stratum_of) else 0
    stratum_records = np.bincount(stratum_of, weights=size, minlength=n_strata)  # over all units: fixed shares
    quotas = _largest_remainder(stratum_records, int(round(fraction * n)))
    taken = []
    for s in range(n_strata):
        units = np.flatnonzero((stratum_of == s) & free)
        units = units[rng.permutation(len(units))]
        q, cur, mine = quotas[s], 0, []
        for u in units:
            if 2 * (q - cur) > size[u]:  # taking u brings the count strictly closer to the quota
                mine.append(u)
                cur += size[u]
        if q > 0 and not mine and len(units) >= 2:  # keep the label present when groups allow it
            mine.append(units[np.argmin(size[units])])
        taken += mine
    return np.sort(np.asarray(taken, dtype=np.int64))


def _iid(rest, size, k, rng) -> list[np.ndarray]:
    units = rest[rng.permutation(len(rest))]
    units = units[np.argsort(-size[units], kind="stable")]  # big patients first, then fill evenly
    load = np.zeros(k, dtype=np.int64)
    out = [[] for _ in range(k)]
    for u in units:
        j = int(np.argmin(load))
        out[j].append(u)
        load[j] += size[u]
    return [np.asarray(o, dtype=np.int64) for o in out]


def _dirichlet(rest, size, ulabel, k, alpha, rng) -> list[np.ndarray]:
    min_records = min(DIRICHLET_MIN_RECORDS, int(size[rest].sum()) // k)
    for _ in range(DIRICHLET_MAX_DRAWS):
        out = [[] for _ in range(k)]
        for c in np.unique(ulabel[rest]):
            units = rest[ulabel[rest] == c]
            units = units[rng.permutation(len(units))]
            p = rng.dirichlet(np.full(k, float(alpha)))
            mid = (np.cumsum(size[units]) - size[units] / 2) / size[units].sum()  # each unit's middle, in [0, 1]
            owner = np.minimum(np.searchsorted(np.cumsum(p), mid, side="right"), k - 1)
            for j in range(k):
                out[j] += units[owner == j].tolist()
        loads = np.array([size[o].sum() if o else 0 for o in out])
        if loads.min() >= min_records:
            return [np.asarray(o, dtype=np.int64) for o in out]
    # repair the last draw: move random units from the largest client to each client below the minimum
    for j in range(k):
        while sum(size[u] for u in out[j]) < min_records:
            loads = np.array([size[o].sum() if o else 0 for o in out])
            donor = int(np.argmax(loads))
            if donor == j or len(out[donor]) <= 1:
                break
            u = out[donor].pop(int(rng.integers(len(out[donor]))))
            out[j].append(u)
    return [np.asarray(o, dtype=np.int64) for o in out]
