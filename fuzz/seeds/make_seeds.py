#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/ and the fixed public keys and
certificates the jwt and x509 harnesses compile in (fuzz/seeds/keys/).

Run from anywhere: python3 fuzz/seeds/make_seeds.py. Needs `cryptography`; the authority seeds
also capture what py-spiffe (PyPI `spiffe`, which scripts/setup installs) really sends, when it is
installed. Re-running makes new keys: the tokens and certificates are re-made with them, so the
committed files always agree with each other. Private keys are never written.
"""

import base64
import datetime
import json
import os
import socket
import struct
import sys
import tempfile
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.x509.oid import NameOID

HERE = os.path.dirname(os.path.abspath(__file__))
FUZZ = os.path.dirname(HERE)
ROOT = os.path.dirname(FUZZ)
KEYS = os.path.join(HERE, "keys")
CORPUS = os.path.join(FUZZ, "corpus")

AUDIENCE = "spiffe://example.org/fuzz-audience"


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def spki(key):
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


# ---------------------------------------------------------------- keys and certificates
os.makedirs(KEYS, exist_ok=True)
ec1 = ec.generate_private_key(ec.SECP256R1())
rsa1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ec_other = ec.generate_private_key(ec.SECP256R1())
rsa_other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
for name, key in [("ec1", ec1), ("rsa1", rsa1), ("ec-other", ec_other), ("rsa-other", rsa_other)]:
    with open(os.path.join(KEYS, name + ".spki"), "wb") as f:
        f.write(spki(key))

not_before = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
not_after = datetime.datetime(2040, 1, 1, tzinfo=datetime.timezone.utc)
ca_key = ec.generate_private_key(ec.SECP256R1())
ca_name = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                     x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")])
ca = (
    x509.CertificateBuilder()
    .subject_name(ca_name).issuer_name(ca_name)
    .public_key(ca_key.public_key()).serial_number(1)
    .not_valid_before(not_before).not_valid_after(not_after)
    .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
    .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://example.org")]), critical=False)
    .sign(ca_key, hashes.SHA256())
)


def leaf_cert(uris, key=None, serial=2):
    key = key or ec.generate_private_key(ec.SECP256R1())
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(serial)
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                              x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if uris:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False)
    return b.sign(ca_key, hashes.SHA256())


ca_der = ca.public_bytes(serialization.Encoding.DER)
leaf = leaf_cert(["spiffe://example.org/continuity/server"])
leaf_der = leaf.public_bytes(serialization.Encoding.DER)
with open(os.path.join(KEYS, "ca.der"), "wb") as f:
    f.write(ca_der)
with open(os.path.join(KEYS, "leaf.der"), "wb") as f:
    f.write(leaf_der)

# ---------------------------------------------------------------- jwt
def jws(header, claims, key):
    h = b64url(json.dumps(header, separators=(",", ":")).encode())
    c = b64url(json.dumps(claims, separators=(",", ":")).encode())
    msg = f"{h}.{c}".encode()
    alg = header.get("alg")
    if alg == "ES256":
        r, s = utils.decode_dss_signature(key.sign(msg, ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    elif alg == "RS256":
        sig = key.sign(msg, padding.PKCS1v15(), hashes.SHA256())
    elif alg == "PS256":
        sig = key.sign(msg, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256())
    else:
        sig = b""
    return f"{h}.{c}.{b64url(sig)}"


claims = {"sub": "spiffe://example.org/ns/prod/sa/web", "aud": [AUDIENCE], "exp": 2_000_000_000, "iat": 1_700_000_000}
jwt_seeds = {
    "es256-valid": jws({"alg": "ES256", "kid": "ec1", "typ": "JWT"}, claims, ec1),
    "rs256-valid": jws({"alg": "RS256", "kid": "rsa1", "typ": "JWT"}, claims, rsa1),
    "ps256-valid": jws({"alg": "PS256", "kid": "rsa1"}, {**claims, "aud": AUDIENCE}, rsa1),
    "es256-exp-max": jws({"alg": "ES256", "kid": "ec1"}, {**claims, "exp": 2**63 - 1}, ec1),
    "es256-exp-min": jws({"alg": "ES256", "kid": "ec1"}, {**claims, "exp": -(2**63)}, ec1),
    "es256-expired": jws({"alg": "ES256", "kid": "ec1"}, {**claims, "exp": 1_000_000_000}, ec1),
    "es256-other-aud": jws({"alg": "ES256", "kid": "ec1"}, {**claims, "aud": ["x", "y"]}, ec1),
    "es256-other-td": jws({"alg": "ES256", "kid": "ec1"}, {**claims, "sub": "spiffe://evil.org/w"}, ec1),
    "es256-no-kid": jws({"alg": "ES256"}, claims, ec1),
    "es256-wrong-kid": jws({"alg": "ES256", "kid": "rsa1"}, claims, ec1),
    "alg-none": jws({"alg": "none", "kid": "ec1"}, claims, None),
    "hs256": jws({"alg": "HS256", "kid": "ec1"}, claims, None) + "c2VjcmV0",
}
for name, tok in jwt_seeds.items():
    write("jwt", name, tok)
ec_nums = ec1.public_key().public_numbers()
rsa_nums = rsa1.public_key().public_numbers()
write("jwt", "jwks", json.dumps({"keys": [
    {"kty": "EC", "crv": "P-256", "kid": "ec1", "use": "jwt-svid",
     "x": b64url(ec_nums.x.to_bytes(32, "big")), "y": b64url(ec_nums.y.to_bytes(32, "big"))},
    {"kty": "RSA", "kid": "rsa1", "use": "jwt-svid",
     "n": b64url(rsa_nums.n.to_bytes(256, "big")), "e": b64url(rsa_nums.e.to_bytes(3, "big"))},
]}))
write("jwt", "ecdsa-der-signature", ec1.sign(b"m", ec.ECDSA(hashes.SHA256())))
write("jwt", "spki-ec", spki(ec1))

# ---------------------------------------------------------------- x509 (first byte: mode % 4)
def varint(n):
    n &= (1 << 64) - 1
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(num, wire, payload):
    key = varint(num << 3 | wire)
    if wire == 0:
        return key + varint(payload)
    return key + varint(len(payload)) + payload


def x509svid(spiffe_id, chain, expires):
    return (field(1, 2, spiffe_id.encode()) + b"".join(field(2, 2, c) for c in chain)
            + field(3, 0, expires))


def bundle(td, cas, jwt_keys, seq):
    out = field(1, 2, td.encode()) + b"".join(field(2, 2, c) for c in cas)
    for kid, key, exp in jwt_keys:
        out += field(3, 2, field(1, 2, key) + field(2, 2, kid.encode()) + field(3, 0, exp))
    return out + field(4, 0, 300) + field(5, 0, seq)


workload = leaf_cert(["spiffe://example.org/w"], serial=3).public_bytes(serialization.Encoding.DER)
two_sans = leaf_cert(["spiffe://example.org/a", "spiffe://example.org/b"], serial=4).public_bytes(serialization.Encoding.DER)
no_san = leaf_cert([], serial=5).public_bytes(serialization.Encoding.DER)
write("x509", "svid-answer", b"\x00" + x509svid("spiffe://example.org/w", [workload], 2_000_000_000))
write("x509", "svid-answer-chain", b"\x00" + x509svid("spiffe://example.org/w", [workload, ca_der], 2_000_000_000))
write("x509", "svid-answer-empty-chain", b"\x00" + x509svid("spiffe://example.org/w", [], 2_000_000_000))
write("x509", "svid-answer-expiry-min", b"\x00" + x509svid("spiffe://example.org/w", [workload], -(2**63)))
write("x509", "svid-answer-two-sans", b"\x00" + x509svid("spiffe://example.org/a", [two_sans], 2_000_000_000))
write("x509", "bundle-answer", b"\x01" + bundle("example.org", [ca_der], [("ec1", spki(ec1), 2_000_000_000), ("rsa1", spki(rsa1), 0)], 7))
write("x509", "bundle-answer-garbage-key", b"\x01" + bundle("example.org", [ca_der, b"\x30\x00"], [("bad", b"\x30\x03\x02\x01\x00", 1)], 8))


def b64(b):
    return base64.b64encode(b).decode()


def svid_json(chain):
    return {"chain": [b64(c) for c in chain], "key": b64(b"not a key"),
            "expires_at": 2_000_000_000, "issued_at": 1_700_000_000, "rotate_at": 1_850_000_000}


state = {
    "agent_id": "spiffe://example.org/continuity/agent/join_token/t",
    "agent_svid": svid_json([leaf_der]),
    "bundle": {"trust_domain": "example.org", "x509_authorities": [b64(ca_der)],
               "jwt_authorities": [{"kid": "ec1", "public_key": b64(spki(ec1)), "expires_at": 2_000_000_000}],
               "sequence": 3},
    "revision": 4,
    "entries": {"e1": {"id": "e1", "spiffe_id": "spiffe://example.org/w",
                       "selectors": [{"type": "unix", "value": "uid:1000"}],
                       "x509_svid_ttl": 0, "jwt_svid_ttl": 0, "hint": "h", "engine": "", "revision": 4},
                "e2": {"id": "e2", "spiffe_id": "spiffe://example.org/v",
                       "selectors": [{"type": "k8s", "value": "ns:prod"}],
                       "x509_svid_ttl": 60, "jwt_svid_ttl": 60, "hint": "", "engine": "pay", "revision": 4}},
    "svids": {"e1": svid_json([workload, ca_der]), "e2": svid_json([])},
    "engine_jwks": {"pay": {"jwks": "{\"keys\":[]}", "keys": [
        {"key": "k", "version": 1, "kid": "pay-1", "algorithm": "ec-p256", "spki": b64(spki(ec1))}]}},
}
write("x509", "state-file", b"\x02" + json.dumps(state).encode())
state["agent_svid"] = svid_json([])
state["svids"]["e1"]["rotate_at"] = 2**63 - 1
write("x509", "state-file-hostile", b"\x02" + json.dumps(state).encode())


def pem(der):
    body = base64.b64encode(der).decode()
    return "-----BEGIN CERTIFICATE-----\n" + "\n".join(body[i:i + 64] for i in range(0, len(body), 64)) + "\n-----END CERTIFICATE-----\n"


write("x509", "bundle-pem", b"\x03" + (pem(ca_der) + pem(leaf_der)).encode())
write("x509", "pem-unterminated", b"\x03" + pem(ca_der)[:-30].encode())
write("x509", "der-leaf", b"\x03" + workload)
write("x509", "der-no-san", b"\x03" + no_san)

# ---------------------------------------------------------------- cgroup
uid = "2c48913c-b29f-11e7-9350-020968147796"
cid = "9f4e6b1f0d5ad0c1e2a0f4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9"
cgroup = {
    "v1-cgroupfs-docker": f"12:memory:/kubepods/burstable/pod{uid}/{cid}\n11:cpu,cpuacct:/kubepods/burstable/pod{uid}/{cid}\n1:name=systemd:/kubepods/burstable/pod{uid}/{cid}\n",
    "v1-systemd-containerd": f"10:pids:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid.replace('-', '_')}.slice/cri-containerd-{cid}.scope\n",
    "v2-systemd-crio": f"0::/kubepods.slice/kubepods-pod{uid.replace('-', '_')}.slice/crio-{cid}.scope\n",
    "v2-guaranteed": f"0::/kubepods.slice/kubepods-pod{uid.replace('-', '_')}.slice/cri-containerd-{cid}.scope\n",
    "kind-nested": f"0::/system.slice/docker-{'a' * 64}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{uid.replace('-', '_')}.slice/cri-containerd-{cid}.scope\n",
    "forged-user-slice": f"0::/user.slice/user-1000.slice/user@1000.service/app.slice/pod{uid}/{cid}\n",
    "crio-conmon": f"0::/kubepods.slice/kubepods-pod{uid.replace('-', '_')}.slice/crio-conmon-{cid}.scope\n",
    "host-daemon": "0::/system.slice/containerd.service\n",
    "docker-plain": f"13:devices:/docker/{cid}\n",
}
# The first byte is the depth of the agent's own cgroup namespace (the harness takes it % 8).
for name, text in cgroup.items():
    write("cgroup", name, b"\x00" + text.encode())
# Seen from an agent whose cgroup namespace root is 3 levels down (its own pod's container).
namespaced = {
    "ns-same-qos": f"0::/../../kubepods-besteffort-pod{uid.replace('-', '_')}.slice/cri-containerd-{cid}.scope\n",
    "ns-other-qos": f"0::/../../../kubepods-burstable.slice/kubepods-burstable-pod{uid.replace('-', '_')}.slice/cri-containerd-{cid}.scope\n",
    "ns-forged-user-slice": f"0::/../../../../user.slice/user-1000.slice/user@1000.service/app.slice/pod{uid}/{cid}\n",
}
for name, text in namespaced.items():
    write("cgroup", name, b"\x03" + text.encode())

# ---------------------------------------------------------------- spiffe_id_selector
for i, s in enumerate([
    "spiffe://example.org/ns/prod/sa/web", "spiffe://example.org", "example.org",
    "spiffe://td_with-dots.and_underscores/a.b-c_d", "spiffe://example.org/a/../b",
    "unix:uid:1000", "unix:sha256:" + "ab" * 32, "unix:path:/usr/bin/python3",
    "k8s:pod-label:app:web", "k8s:ns:prod", "k8s_psat:cluster:c1", "spiffe_id:spiffe://example.org/x",
    "unix\nuid:0", "k8s\npod-owner:ReplicaSet:web",
]):
    write("spiffe_id_selector", f"seed-{i}", s)

# ---------------------------------------------------------------- agent_config
with open(os.path.join(ROOT, "deploy", "agent.full.toml"), "rb") as f:
    write("agent_config", "agent.full.toml", f.read())
write("agent_config", "minimal.toml", 'trust_domain = "example.org"\nserver_address = "127.0.0.1:8081"\ninsecure_bootstrap = true\n')

# ---------------------------------------------------------------- authority
# Harness input: [n] [n piece sizes] [read-buffer size] [client bytes].
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def hint(n, prefix, mask=0):
    top = (1 << prefix) - 1
    if n < top:
        return bytes([mask | n])
    out = [mask | top]
    n -= top
    while n >= 128:
        out.append(n % 128 + 128)
        n //= 128
    return bytes(out + [n])


def literal(name, value, indexed=True):
    """Literal with incremental indexing (0x40) or without (0x00), new name, no Huffman."""
    return (b"\x40" if indexed else b"\x00") + hint(len(name), 7) + name + hint(len(value), 7) + value


def rust_like_request(stream, first):
    """What tonic/h2 (the Rust spiffe crate) sends: a valid :authority, dynamic-table reuse."""
    if first:
        block = (b"\x83\x86" + literal(b":path", b"/SpiffeWorkloadAPI/FetchX509SVID")
                 + literal(b":authority", b"localhost") + literal(b"content-type", b"application/grpc")
                 + literal(b"te", b"trailers") + literal(b"workload.spiffe.io", b"true"))
    else:
        # Indexed references into the dynamic table the first block filled (62 = newest).
        block = b"\x83\x86" + literal(b":path", b"/SpiffeWorkloadAPI/FetchJWTSVID") + bytes([0x80 | 63, 0x80 | 64, 0x80 | 65, 0x80 | 66])
    return frame(1, 0x4, stream, block) + frame(0, 0x1, stream, b"\x00\x00\x00\x00\x00")


settings = frame(4, 0, 0, b"\x00\x03\x00\x00\x00\x64\x00\x04\x00\x40\x00\x00")
window = frame(8, 0, 0, b"\x00\x0f\x00\x01")
rust = PREFACE + settings + window + rust_like_request(1, True) + rust_like_request(3, False)
write("authority", "rust-like-client", b"\x00\xff" + rust)
write("authority", "rust-like-client-pieces", b"\x03\x01\x10\xc8\x07" + rust)
path_block = (b"\x83\x86" + literal(b":path", b"/SpiffeWorkloadAPI/FetchX509SVID")
              + literal(b":authority", b"%2Ftmp%2Fcontinuity-agent%2Fpublic%2Fapi.sock")
              + literal(b"workload.spiffe.io", b"true"))
split = PREFACE + settings + frame(1, 0x8 | 0x20, 1, b"\x02" + b"\x00\x00\x00\x00\x10" + path_block[:7] + b"\x00\x00") + frame(9, 0x4, 1, path_block[7:]) + frame(0, 1, 1, b"\x00" * 5)
write("authority", "socket-path-padded-continuation", b"\x02\x05\x40\x20" + split)
second = b"\x83\x86" + literal(b":path", b"/SpiffeWorkloadAPI/FetchJWTBundles") + bytes([0x80 | 63, 0x80 | 62])
write("authority", "socket-path-two-requests", b"\x00\xff" + PREFACE + frame(1, 0x4, 1, path_block) + frame(1, 0x5, 3, second))
write("authority", "table-size-update", b"\x00\xff" + PREFACE + frame(1, 0x5, 1, b"\x3f\xe1\x1f" + path_block))
mini_bomb = literal(b"x-pad", b"a" * 200) + bytes([0x80 | 62]) * 100
write("authority", "small-expansion", b"\x00\xff" + PREFACE + frame(1, 0x5, 1, literal(b":authority", b"%2Fx", False) + mini_bomb))


def capture_py_spiffe():
    """The bytes py-spiffe (gRPC C-core) sends on a Unix socket, as seen by the server."""
    try:
        from spiffe import WorkloadApiClient
    except ImportError:
        print("make_seeds: py-spiffe not installed, skipping the captured seed", file=sys.stderr)
        return None
    d = tempfile.mkdtemp()
    path = os.path.join(d, "api.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    got = bytearray()

    def serve():
        conn, _ = srv.accept()
        conn.settimeout(1.5)
        conn.sendall(frame(4, 0, 0, b""))
        try:
            while True:
                b = conn.recv(65536)
                if not b:
                    break
                got.extend(b)
                if b"\x00\x00\x00\x00\x00" in got[len(PREFACE):] and len(got) > 200:
                    break
        except socket.timeout:
            pass
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()

    def fetch():
        try:
            WorkloadApiClient(f"unix://{path}").fetch_x509_svid()
        except Exception:
            pass

    threading.Thread(target=fetch, daemon=True).start()
    t.join(5)
    srv.close()
    return bytes(got) if got.startswith(PREFACE) else None


py = capture_py_spiffe()
if py:
    write("authority", "py-spiffe-client", b"\x00\xff" + py)
    write("authority", "py-spiffe-client-pieces", b"\x04\x00\x09\x03\x3f\x0f" + py)
print("make_seeds: wrote", CORPUS, "and", KEYS)
