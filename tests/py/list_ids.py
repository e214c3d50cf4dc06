"""py-spiffe: prints every SPIFFE ID this workload receives, one per line."""
import sys

from spiffe import WorkloadApiClient

with WorkloadApiClient(sys.argv[1]) as client:
    for svid in client.fetch_x509_context().x509_svids:
        print(svid.spiffe_id)
