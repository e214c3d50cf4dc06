#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/ and the fixed public keys and
certificates the jwt and x509 harnesses compile in (fuzz/seeds/keys/).

Run from anywhere: python3 fuzz/seeds/make_seeds.py [TARGET...] (no target: all of them). Needs
`cryptography`; the authority seeds also capture what py-spiffe (PyPI `spiffe`, which
scripts/setup installs) really sends, when it is installed, and the csr seeds include CSRs made
by the `openssl` CLI when it is there. Re-running makes new keys: the tokens and certificates are
re-made with them, so the committed files always agree with each other (naming targets rewrites
only theirs; the files under keys/ are rewritten only with jwt, x509 or oidc_json). Private keys are never
written.
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
SELECTED = set(sys.argv[1:])


def want(*targets):
    return not SELECTED or any(t in SELECTED for t in targets)


def write(target, name, data):
    if not want(target):
        return
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
    if not want("jwt"):
        break
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
if want("x509"):
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


py = capture_py_spiffe() if want("authority") else None
if py:
    write("authority", "py-spiffe-client", b"\x00\xff" + py)
    write("authority", "py-spiffe-client-pieces", b"\x04\x00\x09\x03\x3f\x0f" + py)

# ================================================================ server-side targets
import shutil
import subprocess
import time

from cryptography.hazmat.primitives.asymmetric import ed25519


# ---------------------------------------------------------------- csr (first byte: entry ID
# index % 3, and (byte / 4) % 3 DNS names)
def csr(key, algorithm=hashes.SHA256(), extensions=()):
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "continuity-agent")]))
    for ext, critical in extensions:
        b = b.add_extension(ext, critical=critical)
    return b.sign(key, algorithm).public_bytes(serialization.Encoding.DER)


hostile_exts = [
    (x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://example.org/continuity/server"),
                                  x509.UniformResourceIdentifier("spiffe://evil.org/admin"),
                                  x509.DNSName("evil.example.org")]), False),
    (x509.BasicConstraints(ca=True, path_length=None), True),
    (x509.KeyUsage(True, False, False, False, False, True, True, False, False), True),
]
if want("csr"):
    write("csr", "ec-p256", b"\x00" + csr(ec.generate_private_key(ec.SECP256R1())))
    write("csr", "ec-p384-asks-ca-and-other-ids", b"\x04" + csr(ec.generate_private_key(ec.SECP384R1()), hashes.SHA384(), hostile_exts))
    write("csr", "rsa-2048", b"\x09" + csr(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    write("csr", "rsa-2048-exponent-3", b"\x02" + csr(rsa.generate_private_key(public_exponent=3, key_size=2048)))
    write("csr", "secp256k1", b"\x00" + csr(ec.generate_private_key(ec.SECP256K1())))
    write("csr", "ed25519", b"\x05" + csr(ed25519.Ed25519PrivateKey.generate(), None))
    good = bytearray(csr(ec.generate_private_key(ec.SECP256R1()), extensions=hostile_exts))
    good[-3] ^= 0x01
    write("csr", "bad-signature", b"\x00" + bytes(good))
    write("csr", "truncated", b"\x00" + csr(ec.generate_private_key(ec.SECP256R1()))[:60])
    # What the openssl CLI makes (another implementation; `cryptography` refuses SHA-1).
    if shutil.which("openssl"):
        for name, pick, args in [
            ("openssl-ec-p256", b"\x08", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]),
            ("openssl-rsa-2048-san", b"\x08", ["-newkey", "rsa:2048", "-addext",
                                                "subjectAltName=URI:spiffe://example.org/other"]),
            ("openssl-rsa-1024-sha1", b"\x01", ["-newkey", "rsa:1024", "-sha1"]),
        ]:
            with tempfile.TemporaryDirectory() as d:
                out = os.path.join(d, "csr.der")
                subprocess.run(["openssl", "req", "-new", "-nodes", "-subj", "/CN=agent", "-keyout",
                                os.path.join(d, "key.pem"), "-outform", "DER", "-out", out] + args,
                               check=True, capture_output=True)
                with open(out, "rb") as f:
                    write("csr", name, pick + f.read())
    else:
        print("make_seeds: no openssl CLI, skipping the openssl CSRs", file=sys.stderr)

# ---------------------------------------------------------------- psat (first byte: mode % 2)
ISSUER = "https://kubernetes.default.svc.cluster.local"
psat_claims = {
    "aud": ["continuity-server"], "exp": 2_000_000_000, "iat": 1_700_000_000, "nbf": 1_700_000_000,
    "iss": ISSUER, "sub": "system:serviceaccount:spire:spire-agent",
    "kubernetes.io": {
        "namespace": "spire",
        "node": {"name": "kind-worker", "uid": "646e8ed6-1d53-4a8a-9e3c-5b0e0e6a1f3c"},
        "pod": {"name": "spire-agent-7xk2p", "uid": "2c48913c-b29f-11e7-9350-020968147796"},
        "serviceaccount": {"name": "spire-agent", "uid": "8f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b"},
    },
}


def claims_with(**kw):
    c = json.loads(json.dumps(psat_claims))
    for k, v in kw.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    return c


def signable(claims, header=None):
    """Mode 1: `<header>\\n<claims>`, which the harness signs with the cluster's key."""
    h = header or {"alg": "ES256", "kid": "k1"}
    return b"\x01" + json.dumps(h, separators=(",", ":")).encode() + b"\n" + json.dumps(claims).encode()


k8s = psat_claims["kubernetes.io"]
write("psat", "signed-valid", signable(psat_claims))
write("psat", "signed-aud-string", signable(claims_with(aud="continuity-server")))
write("psat", "signed-expired", signable(claims_with(exp=1_000_000_000)))
write("psat", "signed-exp-max", signable(claims_with(exp=2**63 - 1)))
write("psat", "signed-nbf-future", signable(claims_with(nbf=1_900_000_000)))
write("psat", "signed-iat-future", signable(claims_with(iat=1_900_000_000)))
write("psat", "signed-other-issuer", signable(claims_with(iss="https://evil.example.org")))
write("psat", "signed-other-aud", signable(claims_with(aud=["api", "vault"])))
write("psat", "signed-other-sa", signable(claims_with(**{"kubernetes.io": {**k8s, "serviceaccount": {"name": "default"}}})))
write("psat", "signed-no-node", signable(claims_with(**{"kubernetes.io": {k: v for k, v in k8s.items() if k != "node"}})))
write("psat", "signed-node-uid-slash", signable(claims_with(**{"kubernetes.io": {**k8s, "node": {"name": "n", "uid": "../../x"}}})))
write("psat", "signed-unknown-kid", signable(psat_claims, {"alg": "ES256", "kid": "k2"}))
write("psat", "signed-rs256-header", signable(psat_claims, {"alg": "RS256", "kid": "k1"}))
write("psat", "signed-alg-none", signable(psat_claims, {"alg": "none", "kid": "k1"}))
# Mode 0, whole payloads; the token is signed by a key the cluster does not know.
outsider = ec.generate_private_key(ec.SECP256R1())
real_shape = jws({"alg": "ES256", "kid": "k1"}, psat_claims, outsider)
write("psat", "payload-foreign-key", b"\x00" + json.dumps({"cluster": "c1", "token": real_shape}).encode())
write("psat", "payload-unknown-cluster", b"\x00" + json.dumps({"cluster": "prod", "token": real_shape}).encode())
write("psat", "payload-as-array", b"\x00" + json.dumps(["c1", real_shape]).encode())
write("psat", "payload-two-dots", b"\x00" + b'{"cluster":"c1","token":"a.b.c"}')
write("psat", "payload-junk", b"\x00" + b"\x17\x03\x03garbage")


# ---------------------------------------------------------------- oidc_json (first byte: mode % 3)
def ec_jwk(key, kid, crv="P-256", width=32):
    n = key.public_key().public_numbers()
    return {"use": "sig", "kty": "EC", "kid": kid, "crv": crv, "alg": "ES256" if width == 32 else "ES384",
            "x": b64url(n.x.to_bytes(width, "big")), "y": b64url(n.y.to_bytes(width, "big"))}


def rsa_jwk(key, kid):
    n = key.public_key().public_numbers()
    return {"use": "sig", "kty": "RSA", "kid": kid, "alg": "RS256",
            "n": b64url(n.n.to_bytes((n.n.bit_length() + 7) // 8, "big")), "e": b64url(n.e.to_bytes(3, "big"))}


# The issuer's signing key: the harness validates one fixed token it signed (kid k1) against
# each JWKS input; only the public key and the token are committed.
issuer_key = ec.generate_private_key(ec.SECP256R1())
if want("oidc_json"):
    with open(os.path.join(KEYS, "psat-signer.spki"), "wb") as f:
        f.write(spki(issuer_key))
    with open(os.path.join(KEYS, "psat-token"), "w") as f:
        f.write(jws({"alg": "ES256", "kid": "k1"}, psat_claims, issuer_key))
# What a kube-apiserver serves at /openid/v1/jwks (RSA), plus EC keys and broken entries.
kube_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
write("oidc_json", "jwks-kube-apiserver", b"\x00" + json.dumps({"keys": [rsa_jwk(kube_rsa, "Zt3Yx0N5Qk3S4zJ0gJ3mWcZ0rT1k9y2Hq6lq2b0cV8E")]}).encode())
write("oidc_json", "jwks-signer", b"\x00" + json.dumps({"keys": [rsa_jwk(kube_rsa, "r1"), ec_jwk(issuer_key, "k1")]}).encode())
write("oidc_json", "jwks-signer-under-other-kid", b"\x00" + json.dumps({"keys": [ec_jwk(issuer_key, "k2")]}).encode())
write("oidc_json", "jwks-ec-rsa", b"\x00" + json.dumps({"keys": [
    ec_jwk(ec.generate_private_key(ec.SECP256R1()), "k1"),
    ec_jwk(ec.generate_private_key(ec.SECP384R1()), "k384", "P-384", 48),
    rsa_jwk(kube_rsa, "r1")]}).encode())
write("oidc_json", "jwks-broken-keys", b"\x00" + json.dumps({"keys": [
    {"kty": "EC", "crv": "P-256", "kid": "k1", "x": "AA", "y": "AA"},
    {"kty": "RSA", "kid": "k1", "n": "AA", "e": ""},
    {"kty": "oct", "kid": "k1", "k": "c2VjcmV0"},
    {"kty": "EC", "crv": "P-521", "kid": "k1", "x": "AA", "y": "AA"},
    {"kid": 7}, "not a key", None]}).encode())
write("oidc_json", "discovery-kube-apiserver", b"\x01" + json.dumps({
    "issuer": ISSUER, "jwks_uri": "https://172.18.0.2:6443/openid/v1/jwks",
    "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
    "id_token_signing_alg_values_supported": ["RS256"]}).encode())
write("oidc_json", "discovery-eks", b"\x01" + json.dumps({
    "issuer": "https://oidc.eks.eu-west-1.amazonaws.com/id/0123456789ABCDEF0123456789ABCDEF",
    "jwks_uri": "https://oidc.eks.eu-west-1.amazonaws.com/id/0123456789ABCDEF0123456789ABCDEF/keys",
    "authorization_endpoint": "urn:kubernetes:programmatic_authorization",
    "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
    "claims_supported": ["sub", "iss"], "id_token_signing_alg_values_supported": ["RS256"]}).encode())
write("oidc_json", "discovery-no-jwks-uri", b"\x01" + json.dumps({"issuer": ISSUER, "jwks_uri": 5}).encode())
extra = {
    "authentication.kubernetes.io/credential-id": ["JTI=3f0a8f4e-6c1d-4b52-9d2e-1a7b9c0d2e3f"],
    "authentication.kubernetes.io/node-name": ["kind-worker"],
    "authentication.kubernetes.io/node-uid": [k8s["node"]["uid"]],
    "authentication.kubernetes.io/pod-name": ["spire-agent-7xk2p"],
    "authentication.kubernetes.io/pod-uid": [k8s["pod"]["uid"]],
}
review = {
    "kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "metadata": {"creationTimestamp": None},
    "spec": {"token": real_shape, "audiences": ["continuity-server"]},
    "status": {"authenticated": True, "audiences": ["continuity-server"],
               "user": {"username": "system:serviceaccount:spire:spire-agent", "uid": k8s["serviceaccount"]["uid"],
                        "groups": ["system:serviceaccounts", "system:serviceaccounts:spire", "system:authenticated"],
                        "extra": extra}},
}
write("oidc_json", "tokenreview-authenticated", b"\x02" + json.dumps(review).encode())
write("oidc_json", "tokenreview-refused", b"\x02" + json.dumps({**review, "status": {
    "user": {}, "error": "[invalid bearer token, service account token has expired]"}}).encode())
write("oidc_json", "tokenreview-user-not-sa", b"\x02" + json.dumps({**review, "status": {
    **review["status"], "user": {"username": "kubernetes-admin", "groups": ["system:masters"], "extra": extra}}}).encode())
write("oidc_json", "tokenreview-sa-with-colons", b"\x02" + json.dumps({**review, "status": {
    **review["status"], "user": {**review["status"]["user"], "username": "system:serviceaccount:spire:spire-agent:x"}}}).encode())


# ---------------------------------------------------------------- bundle_json (first byte: mode % 2)
def bundle_doc(cas, jwt_keys, seq, hint):
    """The shape `bundle show --format spiffe` prints (continuity_common::jwk::spiffe_bundle)."""
    def members(pub):
        n = pub.public_numbers()
        if isinstance(pub, ec.EllipticCurvePublicKey):
            w = (pub.curve.key_size + 7) // 8
            return {"kty": "EC", "crv": {256: "P-256", 384: "P-384"}[pub.curve.key_size],
                    "x": b64url(n.x.to_bytes(w, "big")), "y": b64url(n.y.to_bytes(w, "big"))}
        return {"kty": "RSA", "n": b64url(n.n.to_bytes((n.n.bit_length() + 7) // 8, "big")),
                "e": b64url(n.e.to_bytes((n.e.bit_length() + 7) // 8, "big"))}
    keys = []
    for der in cas:
        cert = x509.load_der_x509_certificate(der)
        keys.append({**members(cert.public_key()), "use": "x509-svid", "x5c": [b64(der)]})
    for kid, key in jwt_keys:
        keys.append({**members(key.public_key()), "kid": kid, "use": "jwt-svid"})
    return {"keys": keys, "spiffe_sequence": seq, "spiffe_refresh_hint": hint}


rsa_ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
rsa_ca = (
    x509.CertificateBuilder()
    .subject_name(ca_name).issuer_name(ca_name)
    .public_key(rsa_ca_key.public_key()).serial_number(9)
    .not_valid_before(not_before).not_valid_after(not_after)
    .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    .sign(rsa_ca_key, hashes.SHA256())
).public_bytes(serialization.Encoding.DER)
jwt_p256 = ec.generate_private_key(ec.SECP256R1())
jwt_p384 = ec.generate_private_key(ec.SECP384R1())
write("bundle_json", "getbundle-answer", b"\x00" + bundle("example.org", [ca_der, rsa_ca],
      [("Xk2b9n3mQ0qL1pV7tR4sYw", spki(jwt_p256), 2_000_000_000), ("p384", spki(jwt_p384), 2_000_000_000)], 12))
write("bundle_json", "getbundle-answer-garbage", b"\x00" + bundle("example.org", [ca_der, b"\x30\x00"], [("bad", b"\x30\x03\x02\x01\x00", 1)], 13))
write("bundle_json", "getbundle-answer-empty", b"\x00" + bundle("example.org", [], [], 0))
write("bundle_json", "bundle-doc", b"\x01" + json.dumps(bundle_doc([ca_der, rsa_ca], [("Xk2b9n3mQ0qL1pV7tR4sYw", jwt_p256)], 12, 300), indent=2).encode())
write("bundle_json", "jwks-only", b"\x01" + json.dumps({"keys": [ec_jwk(jwt_p384, "p384", "P-384", 48), rsa_jwk(rsa_ca_key, "r")]}).encode())


def capture_bundle_show():
    """What the real `continuity-server bundle show --format spiffe` prints, when it is built."""
    exe = os.environ.get("CONTINUITY_SERVER") or os.path.join(
        os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"), "debug", "continuity-server")
    if not os.access(exe, os.X_OK):
        print("make_seeds: no continuity-server binary, skipping the captured bundle", file=sys.stderr)
        return None
    d = tempfile.mkdtemp()
    sock = os.path.join(d, "admin", "admin.sock")
    cfg = os.path.join(d, "server.toml")
    with open(cfg, "w") as f:
        f.write(f'trust_domain = "example.org"\ndata_dir = "{d}/data"\nbind_address = "127.0.0.1:0"\n'
                f'admin_socket = "{sock}"\n[key_manager]\nkind = "memory"\n')
    srv = subprocess.Popen([exe, "run", "--config", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            r = subprocess.run([exe, "--socket", sock, "bundle", "show", "--format", "spiffe"], capture_output=True)
            if r.returncode == 0 and r.stdout.startswith(b"{"):
                return r.stdout
            time.sleep(0.1)
        return None
    finally:
        srv.terminate()
        srv.wait()
        shutil.rmtree(d, ignore_errors=True)


shown = capture_bundle_show() if want("bundle_json") else None
if shown:
    write("bundle_json", "bundle-show-spiffe", b"\x01" + shown)
    # The same bundle as the GetBundle answer the CLI turned into it (a real server's CA).
    doc = json.loads(shown)

    def jwk_spki(k):
        def num(f):
            return int.from_bytes(base64.urlsafe_b64decode(k[f] + "=" * (-len(k[f]) % 4)), "big")
        curve = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1()}[k["crv"]]
        return ec.EllipticCurvePublicNumbers(num("x"), num("y"), curve).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    cas = [base64.b64decode(k["x5c"][0]) for k in doc["keys"] if k["use"] == "x509-svid"]
    jwts = [(k["kid"], jwk_spki(k), 2_000_000_000) for k in doc["keys"] if k["use"] == "jwt-svid" and k["kty"] == "EC"]
    write("bundle_json", "getbundle-answer-real-server", b"\x00" + bundle("example.org", cas, jwts, doc["spiffe_sequence"]))

# ---------------------------------------------------------------- server_config
with open(os.path.join(ROOT, "deploy", "server.full.toml"), "rb") as f:
    write("server_config", "server.full.toml", f.read())
write("server_config", "minimal.toml", 'trust_domain = "example.org"\n')
write("server_config", "psat-clusters.toml", """trust_domain = "example.org"
data_dir = "/tmp/continuity"
ca_ttl = "7d"
default_x509_svid_ttl = "1h 30m"
default_jwt_svid_ttl = "300"

[node_attestors.k8s_psat.clusters.offline]
service_account_allow_list = ["spire:spire-agent", "kube-system:agent"]
jwks_path = "/etc/continuity/jwks.json"
issuer = "https://kubernetes.default.svc.cluster.local"

[node_attestors.k8s_psat.clusters.discovery]
service_account_allow_list = ["spire:spire-agent"]
audience = "other"
oidc_discovery_url = "https://oidc.example.com/c"
oidc_ca_path = "/etc/continuity/oidc-ca.pem"

[node_attestors.k8s_psat.clusters."review.prod"]
service_account_allow_list = ["spire:spire-agent"]
token_review_api_server = "https://kubernetes.default.svc"
token_review_ca_path = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
token_review_token_path = "/var/run/secrets/kubernetes.io/serviceaccount/token"
""")
write("server_config", "pkcs11.toml", """trust_domain = "example.org"
ca_key_type = "rsa-4096"
log_level = "debug"
log_format = "json"

[datastore]
url = "postgres://continuity@db:5432/continuity"

[key_manager]
kind = "pkcs11"
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "continuity"
pin_file = "/etc/continuity/pkcs11.pin"
""")
write("server_config", "refused-pin-in-file.toml", 'trust_domain = "example.org"\n[key_manager]\nkind = "pkcs11"\npin = "1234"\n')
write("server_config", "refused-ttls.toml", 'trust_domain = "example.org"\nca_ttl = "1h"\ndefault_x509_svid_ttl = "2h"\n')
write("server_config", "huge-ttl.toml", 'trust_domain = "example.org"\nca_ttl = "18446744073709551615"\ndefault_x509_svid_ttl = "1h"\n')

# ---------------------------------------------------------------- key_import
# First byte: 0/3/6/9/12 = a public-key file for ec-p256/ec-p384/rsa-2048/rsa-3072/rsa-4096,
# 1 = an AES-KWP part under the harness's ephemeral key (0x42 * 32), 98 = a 32-byte KEK of the input's own.
if want("key_import"):
    from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

    for pick, name, key in [
        (0, "spki-p256", ec.generate_private_key(ec.SECP256R1())),
        (3, "spki-p384", ec.generate_private_key(ec.SECP384R1())),
        (6, "spki-rsa2048", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        (9, "spki-rsa3072", rsa.generate_private_key(public_exponent=65537, key_size=3072)),
    ]:
        write("key_import", name, bytes([pick]) + spki(key))
    p256 = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    kek = b"\x42" * 32
    write("key_import", "kwp-p256-pkcs8", b"\x01" + aes_key_wrap_with_padding(kek, p256))
    write("key_import", "kwp-aes256", b"\x01" + aes_key_wrap_with_padding(kek, os.urandom(32)))
    write("key_import", "kwp-short", b"\x01" + aes_key_wrap_with_padding(kek, b"k"))
    write("key_import", "own-kek", bytes([98]) + kek + aes_key_wrap_with_padding(kek, b"k" * 9))

print("make_seeds: wrote", CORPUS, "and", KEYS)
