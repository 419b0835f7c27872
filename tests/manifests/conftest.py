"""Shared by the tests that talk to the fake Kubernetes API: each module defines its own
``fake`` (the nodes it needs); ``client`` connects to it."""

import pytest

from manifests.kube import KubeClient


@pytest.fixture()
def client(fake, tmp_path):
    c = KubeClient.connect(fake.kubeconfig(tmp_path / "kubeconfig"))
    yield c
    c.close()
