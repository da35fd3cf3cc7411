"""A hospital's side: a snapshot of the approved code, its default policy, its prepared home directory."""

from __future__ import annotations

from pathlib import Path

from secure_fedkim.deploy.processes import DeployError


def snapshot_code(dest: str | Path, packages: tuple[str, ...] = ("secure_fedkim", "privacy")) -> Path:
    """Copy the installed sources of `packages` to `dest` (no caches): with `dest` first on PYTHONPATH
    (`Deployment(env={"PYTHONPATH": ...})`), every process runs exactly this code, whatever happens to
    the installed copy meanwhile, and `policy.code_sha256(search_path=[dest])` is what hospitals approve."""
    import importlib.util
    import shutil

    dest = Path(dest)
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise DeployError(f"package {name!r} is not installed")
        src = Path(list(spec.submodule_search_locations)[0])
        shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=False)
    return dest


def default_policy(hospital: str, code: str | None = None, **overrides) -> dict:
    """A starting policy for `hospital`: DP required (epsilon <= 8, delta <= 1e-5), he or secagg only, at
    least 2 hospitals per aggregate, and the code installed here (or `code`, a code_sha256) approved.
    Review it before signing."""
    from secure_fedkim.deploy.policy import code_sha256

    policy = {
        "version": 1,
        "hospital": hospital,
        "privacy": {"require_dp": True, "max_target_epsilon": 8.0, "max_delta": 1e-5},
        "aggregation": {"allowed_modes": ["he", "secagg"], "min_clients": 2},
        "max_rounds": 50,
        "approved_code": [{"sha256": code or code_sha256(), "note": "secure-fedkim as installed when this policy was written"}],
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(policy.get(key), dict):
            policy[key] = {**policy[key], **value}
        else:
            policy[key] = value
    return policy


def prepare_hospital(name: str, home: str | Path, server_keys: str | Path | None = None, policy: dict | None = None) -> Path | None:
    """A hospital's onboarding on its own machine: its Ed25519 signing key in its state dir (created once),
    its public key handed to the federation (`server_keys/<name>.pub`, what the HE aggregator verifies),
    and, with `policy`, its policy written to `home/policy.yaml` and signed with its key. Returns the
    policy's path (None without a policy)."""
    from secure_fedkim.deploy.identity import ensure_signing_key, load_signing_key
    from secure_fedkim.deploy.policy import write_policy
    from secure_fedkim.rundir.layout import HospitalDir, public_key_file

    home = Path(home)
    public = ensure_signing_key(home)
    if server_keys is not None:
        Path(server_keys).mkdir(parents=True, exist_ok=True)
        public_key_file(server_keys, name).write_bytes(public)
    if policy is None:
        return None
    return write_policy(HospitalDir(home).policy, policy, load_signing_key(home))
