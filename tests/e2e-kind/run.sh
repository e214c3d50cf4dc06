#!/usr/bin/env bash
# End to end on a kind cluster: builds the image, loads it, applies deploy/k8s, publishes
# the bundle, registers an Engine-bound entry for the example Deployment, and checks that
#   1. a workload pod gets its SVID with py-spiffe,
#   2. a replacement pod (after deleting one) signs with the same Engine key,
#   3. deleting an agent pod does not interrupt the other workloads.
# Without a container engine (or kind/kubectl) it prints "SKIPPED: <reason>" and exits 0.
set -euo pipefail
cd "$(dirname "$0")/../.."

skip() { echo "SKIPPED: $*"; exit 0; }
engine=""
for e in docker podman; do
  if command -v "$e" >/dev/null 2>&1 && "$e" info >/dev/null 2>&1; then engine="$e"; break; fi
done
[ -n "$engine" ] || skip "no running container engine (docker or podman) on this machine"
command -v kind >/dev/null 2>&1 || skip "kind is not installed"
command -v kubectl >/dev/null 2>&1 || skip "kubectl is not installed"

cluster="continuity-e2e-$$"
trap 'kind delete cluster --name "$cluster" >/dev/null 2>&1 || true' EXIT
kind create cluster --name "$cluster" --wait 120s
"$engine" build -f deploy/Dockerfile -t continuity:dev .
kind load docker-image continuity:dev --name "$cluster"

kubectl apply -f deploy/k8s/namespace.yaml
kubectl -n continuity create configmap continuity-bundle --from-literal=bundle.pem="" --dry-run=client -o yaml | kubectl apply -f -
kubectl apply -k deploy/k8s
kubectl -n continuity rollout status statefulset/continuity-server --timeout=180s
srv() { kubectl -n continuity exec continuity-server-0 -- continuity-server --socket /run/continuity/private/admin.sock "$@"; }
kubectl -n continuity create configmap continuity-bundle --from-literal=bundle.pem="$(srv bundle show)" --dry-run=client -o yaml | kubectl apply -f -
kubectl -n continuity rollout restart daemonset/continuity-agent
kubectl -n continuity rollout status daemonset/continuity-agent --timeout=180s

node_uid=$(kubectl get nodes -o jsonpath='{.items[0].metadata.uid}')
agent_id="spiffe://example.org/continuity/agent/k8s_psat/demo/$node_uid"
srv engine create payments --tier 1
srv engine key create payments signing --purpose sign
srv entry create --spiffe-id spiffe://example.org/ns/default/sa/payments --parent-id "$agent_id" \
  --selector k8s:ns:default --selector k8s:sa:payments --engine payments
kubectl rollout restart deployment/payments
kubectl rollout status deployment/payments --timeout=180s

pod=$(kubectl get pods -l app=payments -o jsonpath='{.items[0].metadata.name}')
echo "1. py-spiffe in $pod"
kubectl cp tests/py/list_ids.py "default/$pod:/tmp/list_ids.py"
kubectl exec "$pod" -- sh -c 'command -v python3 >/dev/null || exit 0; pip install -q spiffe && python3 /tmp/list_ids.py "$SPIFFE_ENDPOINT_SOCKET"' \
  | grep -q "spiffe://example.org/ns/default/sa/payments"
kubectl exec "$pod" -- continuity-agent api fetch x509 | grep -q "spiffe://example.org/ns/default/sa/payments"

echo "2. a replacement pod is the same Engine"
kubectl exec "$pod" -- sh -c 'echo hello > /tmp/m && continuity-agent engine public-key --key signing' > /tmp/pub-before.pem
kubectl delete pod "$pod" --wait=true
kubectl rollout status deployment/payments --timeout=180s
new=$(kubectl get pods -l app=payments -o jsonpath='{.items[0].metadata.name}')
kubectl exec "$new" -- continuity-agent engine public-key --key signing > /tmp/pub-after.pem
cmp /tmp/pub-before.pem /tmp/pub-after.pem
srv engine incarnations payments

echo "3. an agent pod restart does not interrupt workloads"
other=$(kubectl get pods -l app=payments -o jsonpath='{.items[1].metadata.name}')
restarts() { kubectl get pod "$other" -o jsonpath='{.status.containerStatuses[0].restartCount}'; }
before=$(restarts)
kubectl -n continuity delete pod -l app.kubernetes.io/name=continuity-agent --wait=true
kubectl -n continuity rollout status daemonset/continuity-agent --timeout=180s
# The new agent pod resumes from its state on the node: the workload is served at once,
# without a new attestation of the node and without its own container restarting.
kubectl exec "$other" -- continuity-agent api fetch x509 | grep -q payments
[ "$(restarts)" = "$before" ]
echo "e2e-kind: all checks passed"
