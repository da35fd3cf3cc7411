import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """2 shared cores: one thread per test process trains the attack tests' tiny models fastest."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def flower_identity(monkeypatch):
    """Flower stamps messages with the run/node/task id it sets when it runs an app; tests that build
    messages by hand to call the real ServerApp strategy or ClientApp set the same identity."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 7)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture(scope="module")
def issuer_key(tmp_path_factory):
    """The report issuer's signing key, in a key store outside every run directory (as `secure-fedkim report-key`),
    set in $SECURE_FEDKIM_REPORT_KEY for the module's tests and restored after them."""
    from secure_fedkim.report.sign import KEY_ENV, new_issuer_key

    key = new_issuer_key(tmp_path_factory.mktemp("issuer") / "report_signing_key.pem", "Ada Example", "Test Federation Office")
    old = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = str(key)
    yield key
    if old is None:
        os.environ.pop(KEY_ENV, None)
    else:
        os.environ[KEY_ENV] = old
