"""py-spiffe (PyPI `spiffe`, unmodified) fetches an X509-SVID whose chain runs through
intermediates, and `cryptography`'s RFC 5280 path builder validates it against the fetched
bundle's authorities only (the upstream roots).

Prints one JSON line; exits non-zero on any failure.
"""
import json
import sys

from cryptography.x509.verification import PolicyBuilder, Store
from spiffe import WorkloadApiClient

endpoint = sys.argv[1]
with WorkloadApiClient(endpoint) as client:
    svid = client.fetch_x509_svid()
    bundles = client.fetch_x509_bundles()
bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
roots = list(bundle.x509_authorities)
verifier = PolicyBuilder().store(Store(roots)).build_client_verifier()
leaf, intermediates = svid.cert_chain[0], svid.cert_chain[1:]
verified = verifier.verify(leaf, intermediates)
print(json.dumps({
    "spiffe_id": str(svid.spiffe_id),
    "chain_len": len(svid.cert_chain),
    "authorities": len(roots),
    "verified_chain_len": len(verified.chain),
    "anchor_is_bundle_root": verified.chain[-1] in roots,
}))
