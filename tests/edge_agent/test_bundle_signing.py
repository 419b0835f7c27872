"""Bundle signatures (edge_agent.bundle.signing) on small bundles written here: sign, verify,
tamper, wrong and missing keys, several signatures, the signature file and the store."""

from __future__ import annotations

import json
import stat

import pytest

from edge_agent.bundle import (
    MANIFEST_NAME,
    SIGNATURES_NAME,
    manifest_digest,
    open_bundle,
)
from edge_agent.bundle.signing import (
    TrustPolicy,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    load_trust,
    open_trusted,
    read_signatures,
    sign_bundle,
    signature_status,
    signed_message,
)
from edge_agent.errors import (
    BundleFormatError,
    BundleIntegrityError,
    BundleSignatureError,
    SigningKeyError,
)
from tests.test_bundle import toy_bundle


@pytest.fixture
def keys(tmp_path):
    """Two key pairs: ``a`` and ``b``, each (private path, public path, key id)."""
    d = tmp_path / "keys"
    d.mkdir()
    return {n: generate_keypair(d / f"{n}.key") for n in ("a", "b")}


def _sign(bundle, keys, name):
    return sign_bundle(bundle.path, load_private_key(keys[name][0]))


def test_sign_then_verify_and_the_digest_does_not_change(tmp_path, keys):
    b = toy_bundle(tmp_path / "store")
    before = (b.path / MANIFEST_NAME).read_bytes()
    signed, sig = _sign(b, keys, "a")
    assert sig.key_id == keys["a"][2] and sig.digest == b.digest
    assert (b.path / MANIFEST_NAME).read_bytes() == before
    assert open_bundle(b.path).digest == b.digest  # the signature file is not "unlisted"
    trust = load_trust([keys["a"][1]])
    assert trust.check_bundle(signed) == keys["a"][2]
    assert open_trusted(b.path, trust).digest == b.digest
    assert signature_status(signed, trust) == f"signed by trusted key {keys['a'][2]}"
    # nothing but the signature file was added; no temporary file was left anywhere
    assert sorted(p.name for p in b.path.iterdir()) == sorted(
        [MANIFEST_NAME, SIGNATURES_NAME, "model.onnx", "model.onnx.data", "tokenizer.json"])
    assert [p.name for p in b.path.parent.iterdir()] == [b.path.name]


def test_a_flipped_byte_in_a_file_is_a_digest_mismatch_even_when_signed(tmp_path, keys):
    b = toy_bundle(tmp_path / "store")
    _sign(b, keys, "a")
    victim = b.path / "model.onnx.data"
    data = bytearray(victim.read_bytes())
    data[7] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError) as err:
        open_trusted(b.path, load_trust([keys["a"][1]]))
    assert err.value.problems == ["model.onnx.data: sha256 mismatch"]


def test_an_edited_manifest_no_longer_matches_its_signature(tmp_path, keys):
    b = toy_bundle(tmp_path / "store")
    _sign(b, keys, "a")
    mpath = b.path / MANIFEST_NAME
    m = json.loads(mpath.read_text())
    m["precision"] = "int4"  # files still match: only the signature can tell
    mpath.write_text(json.dumps(m))
    edited = open_bundle(b.path)
    with pytest.raises(BundleSignatureError) as err:
        load_trust([keys["a"][1]]).check_bundle(edited)
    msg = str(err.value)
    assert edited.digest12 in msg and keys["a"][2] in msg and "does not verify" in msg
    assert "\n" not in msg and msg.endswith("refused")
    # even without trusted keys, `bundle verify` refuses a signature that does not verify
    with pytest.raises(BundleSignatureError, match="does not verify"):
        signature_status(edited, None)


def test_a_bundle_signed_by_another_key_is_refused_naming_both(tmp_path, keys):
    b = toy_bundle(tmp_path / "store")
    _sign(b, keys, "b")
    with pytest.raises(BundleSignatureError) as err:
        open_trusted(b.path, load_trust([keys["a"][1]]))
    msg = str(err.value)
    assert msg == (f"bundle toy {b.digest12} is signed only by untrusted keys {keys['b'][2]}; "
                   f"trusted keys: {keys['a'][2]}: refused")
    assert err.value.digest == b.digest and err.value.seen == (keys["b"][2],)


def test_an_unsigned_bundle_is_refused_under_a_trust_policy_only(tmp_path, keys):
    b = toy_bundle(tmp_path / "store")
    assert open_trusted(b.path, None).digest == b.digest  # no policy: as before
    assert signature_status(b, None) == "unsigned"
    with pytest.raises(BundleSignatureError, match=f"bundle toy {b.digest12} is not signed; "
                       f"trusted keys: {keys['a'][2]}: refused"):
        open_trusted(b.path, load_trust([keys["a"][1]]))


def test_two_signatures_one_trusted_is_enough(tmp_path, keys):
    b = toy_bundle(tmp_path / "store")
    _sign(b, keys, "a")
    _sign(b, keys, "b")
    _sign(b, keys, "b")  # re-signing with a key replaces its entry
    assert sorted(s.key_id for s in read_signatures(b.path)) == sorted(
        [keys["a"][2], keys["b"][2]])
    assert load_trust([keys["b"][1]]).check_bundle(b) == keys["b"][2]
    assert load_trust([keys["a"][1]]).check_bundle(b) == keys["a"][2]
    assert "signed by" in signature_status(b, None)


def test_a_forged_signature_under_a_trusted_key_id_is_refused(tmp_path, keys):
    """Key b signs, but the entry claims key a's id (and carries a's public key)."""
    b = toy_bundle(tmp_path / "store")
    _sign(b, keys, "b")
    doc = json.loads((b.path / SIGNATURES_NAME).read_text())
    a_pub = load_public_key(keys["a"][1])
    import base64

    from edge_agent.bundle.signing import _raw

    doc["signatures"][0]["key_id"] = key_id(a_pub)
    doc["signatures"][0]["public_key"] = base64.b64encode(_raw(a_pub)).decode()
    (b.path / SIGNATURES_NAME).write_text(json.dumps(doc))
    with pytest.raises(BundleSignatureError, match="does not verify"):
        load_trust([keys["a"][1]]).check_bundle(b)


def test_unlisted_files_other_than_the_signature_file_are_still_refused(tmp_path, keys):
    b = toy_bundle(tmp_path / "store")
    _sign(b, keys, "a")
    (b.path / "edgegen.sig.bak").write_text("{}")
    with pytest.raises(BundleIntegrityError) as err:
        open_bundle(b.path)
    assert err.value.problems == ["edgegen.sig.bak: not listed in the manifest"]


def test_a_manifest_may_not_list_the_signature_file(tmp_path):
    b = toy_bundle(tmp_path / "store")
    mpath = b.path / MANIFEST_NAME
    m = json.loads(mpath.read_text())
    m["files"][SIGNATURES_NAME] = {"sha256": "0" * 64, "size": 0}
    mpath.write_text(json.dumps(m))
    with pytest.raises(BundleFormatError, match="edgegen.sig"):
        open_bundle(b.path)


def test_a_malformed_signature_file_is_refused_under_a_policy(tmp_path, keys):
    b = toy_bundle(tmp_path / "store")
    (b.path / SIGNATURES_NAME).write_text("not json")
    assert open_bundle(b.path).digest == b.digest
    with pytest.raises(BundleSignatureError, match="not a valid edgegen.signatures/v1 file"):
        open_trusted(b.path, load_trust([keys["a"][1]]))


def test_the_signature_is_over_the_prefixed_digest(tmp_path, keys):
    b = toy_bundle(tmp_path / "store")
    _, sig = _sign(b, keys, "a")
    load_public_key(keys["a"][1]).verify(
        sig.signature, f"edgegen.signatures/v1:{manifest_digest(b.manifest)}".encode())
    assert signed_message(b.digest) == f"edgegen.signatures/v1:{b.digest}".encode()


def test_signing_refuses_a_bundle_whose_files_do_not_match(tmp_path, keys):
    b = toy_bundle(tmp_path / "store")
    (b.path / "tokenizer.json").write_text('{"x": 1}')
    with pytest.raises(BundleIntegrityError):
        _sign(b, keys, "a")
    assert not (b.path / SIGNATURES_NAME).exists()


def test_keygen_writes_a_private_key_0600_and_never_overwrites(tmp_path):
    priv, pub, kid = generate_keypair(tmp_path / "release.key")
    assert pub == tmp_path / "release.pub"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert priv.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert key_id(load_public_key(pub)) == kid == key_id(load_private_key(priv).public_key())
    with pytest.raises(SigningKeyError, match="already exists"):
        generate_keypair(tmp_path / "release.key")


def test_trust_from_a_directory_of_keys_and_bad_key_files(tmp_path, keys):
    d = tmp_path / "keys"
    trust = load_trust([d])  # a.pub and b.pub; the private keys are not *.pub
    assert isinstance(trust, TrustPolicy)
    assert set(trust.key_ids) == {keys["a"][2], keys["b"][2]}
    assert load_trust([]) is None and load_trust(None) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SigningKeyError, match="holds no"):
        load_trust([empty])
    with pytest.raises(SigningKeyError, match="cannot read"):
        load_trust([tmp_path / "missing.pub"])
    with pytest.raises(SigningKeyError, match="not a PEM public key"):
        load_trust([keys["a"][0]])  # a private key given as a trusted key
    with pytest.raises(SigningKeyError, match="not an unencrypted PEM private key"):
        load_private_key(keys["a"][1])
