"""py-spiffe (PyPI `spiffe`, unmodified) against a Continuity agent: every Workload API call.

Prints one JSON line with what it got; exits non-zero on any failure.
"""
import json
import sys

from spiffe import WorkloadApiClient

endpoint, audience = sys.argv[1], sys.argv[2]
with WorkloadApiClient(endpoint) as client:
    svid = client.fetch_x509_svid()
    bundles = client.fetch_x509_bundles()
    jwt = client.fetch_jwt_svid(audience={audience})
    jwt_bundles = client.fetch_jwt_bundles()
    validated = client.validate_jwt_svid(jwt.token, audience)
    td = svid.spiffe_id.trust_domain
    x509_bundle = bundles.get_bundle_for_trust_domain(td)
    jwt_bundle = jwt_bundles.get_bundle_for_trust_domain(td)
    print(json.dumps({
        "x509_spiffe_id": str(svid.spiffe_id),
        "x509_chain_len": len(svid.cert_chain),
        "x509_authorities": len(x509_bundle.x509_authorities),
        "jwt_spiffe_id": str(jwt.spiffe_id),
        "jwt_token": jwt.token,
        "jwt_authorities": len(jwt_bundle.jwt_authorities),
        "validated_spiffe_id": str(validated.spiffe_id),
        "validated_audience": sorted(validated.audience),
    }))
