"""An OIDC relying party built on PyJWT: given only an issuer URL, it reads the discovery
document, follows its jwks_uri and validates a JWT (signature, exp, aud, iss).

usage: oidc_relying_party.py ISSUER AUDIENCE TOKEN
prints JSON: {"ok": true, "sub": ..., "kid": ...} or {"ok": false, "error": <class name>}.
       oidc_relying_party.py forge TOKEN
prints TOKEN's header and claims signed by a fresh P-256 key (same kid): what an attacker
without the server's key can make.
"""

import json
import sys
import urllib.request

import jwt


def forge(token):
    from cryptography.hazmat.primitives.asymmetric import ec

    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    other = ec.generate_private_key(ec.SECP256R1())
    print(jwt.encode(claims, other, algorithm="ES256", headers={"kid": header["kid"]}))


def main():
    if sys.argv[1] == "forge":
        forge(sys.argv[2])
        return
    issuer, audience, token = sys.argv[1], sys.argv[2], sys.argv[3]
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    with urllib.request.urlopen(url, timeout=10) as r:
        doc = json.load(r)
    client = jwt.PyJWKClient(doc["jwks_uri"], cache_keys=False)
    try:
        key = client.get_signing_key_from_jwt(token)
        claims = jwt.decode(
            token,
            key.key,
            algorithms=doc["id_token_signing_alg_values_supported"],
            audience=audience,
            issuer=doc["issuer"],
            options={"require": ["exp", "sub", "aud", "iss"]},
        )
    except (jwt.PyJWTError, jwt.PyJWKClientError) as e:
        print(json.dumps({"ok": False, "error": type(e).__name__}))
        return
    print(json.dumps({"ok": True, "sub": claims["sub"], "kid": key.key_id}))


if __name__ == "__main__":
    main()
