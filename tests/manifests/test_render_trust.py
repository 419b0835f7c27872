"""Trusted bundle keys in the K3s manifests: a ConfigMap of public keys mounted into the init
container (`bundle pull --trust`) and the agent (`--trust-key`); absent, nothing changes."""

import pytest

from manifests.errors import RenderError
from manifests.render import TRUSTED_KEYS_PATH, DeployConfig, find, render
from tests.manifests.test_render import BUNDLE, validate


@pytest.mark.parametrize("central", [True, False])
def test_trusted_keys_configmap_reaches_pull_and_agent(central):
    docs = render(DeployConfig(bundle=BUNDLE, trusted_keys="edgegen-trusted-keys",
                               central=central))
    for doc in docs:
        validate(doc)
    pods = [find(docs, "DaemonSet", "edgegen-edge")]
    if central:
        pods.append(find(docs, "Deployment", "edgegen-central"))
    for obj in pods:
        spec = obj["spec"]["template"]["spec"]
        [vol] = [v for v in spec["volumes"] if v["name"] == "trusted-keys"]
        assert vol["configMap"]["name"] == "edgegen-trusted-keys"
        [pull] = spec["initContainers"]
        assert pull["args"][-2:] == ["--trust", TRUSTED_KEYS_PATH]
        [agent] = spec["containers"]
        i = agent["args"].index("--trust-key")
        assert agent["args"][i + 1] == TRUSTED_KEYS_PATH
        for c in (pull, agent):
            [m] = [m for m in c["volumeMounts"] if m["name"] == "trusted-keys"]
            assert m == {"name": "trusted-keys", "mountPath": TRUSTED_KEYS_PATH,
                         "readOnly": True}


def test_without_trusted_keys_nothing_is_mounted_or_passed():
    docs = render(DeployConfig(bundle=BUNDLE))
    spec = find(docs, "DaemonSet", "edgegen-edge")["spec"]["template"]["spec"]
    assert "--trust" not in spec["initContainers"][0]["args"]
    assert "--trust-key" not in spec["containers"][0]["args"]
    assert [v["name"] for v in spec["volumes"]] == ["bundle-cache"]


def test_the_configmap_name_is_checked_and_survives_the_deploy_record():
    with pytest.raises(RenderError, match="trusted keys ConfigMap"):
        render(DeployConfig(bundle=BUNDLE, trusted_keys="Not_A_Name"))
    cfg = DeployConfig(bundle=BUNDLE, trusted_keys="keys")
    assert DeployConfig.from_json(cfg.to_json()) == cfg
