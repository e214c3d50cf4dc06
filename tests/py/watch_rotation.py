"""py-spiffe (PyPI `spiffe`, unmodified) watching X.509 contexts through a forced rotation.

Prints one JSON line per update: the issuer (authority key identifier, hex) of every SVID and
how many X.509 authorities the bundle holds; a failed fetch prints {"error": ...}. Runs until
stdin closes. No retries: any stream failure is reported, never hidden.
"""
import json
import sys

from cryptography import x509
from spiffe import WorkloadApiClient


def issuer(svid):
    ext = svid.leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    return ext.value.key_identifier.hex()


def on_success(ctx):
    td = ctx.default_svid.spiffe_id.trust_domain
    bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(td)
    print(json.dumps({
        "issuers": sorted(issuer(s) for s in ctx.x509_svids),
        "authorities": len(bundle.x509_authorities),
    }), flush=True)


def on_error(err):
    print(json.dumps({"error": repr(err)}), flush=True)


with WorkloadApiClient(sys.argv[1]) as client:
    handle = client.stream_x509_contexts(on_success, on_error, retry_connect=False)
    sys.stdin.read()
    handle.cancel()
