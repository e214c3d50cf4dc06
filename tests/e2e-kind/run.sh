#!/usr/bin/env bash
# End to end on a kind cluster with two workers (tests/e2e-kind/kind.yaml): builds the image,
# loads it, applies deploy/k8s (the server publishes its bundle into the ConfigMap the agents
# bootstrap from), applies a ClusterSPIFFEID (tests/e2e-kind/payments-clusterspiffeid.yaml) from
# which the server's controller registers every replica, Engine-bound, under the node alias
# entry it keeps for cluster `demo`, scales the example Deployment to three replicas spread over
# both workers, and checks that
#   1. every replica gets the same SPIFFE ID from the agent on its node (the agent's own CLI:
#      the image needs no python3),
#   2. Engine signatures from each replica verify against one JWKS,
#   3. deleting an agent pod and then the server pod keeps every workload served.
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

id="spiffe://example.org/ns/default/sa/payments"
alias_id="spiffe://example.org/node/k8s/demo"   # the [controller] node_alias_id in deploy/k8s/server-config.yaml
cluster="continuity-e2e-$$"
work=$(mktemp -d)
trap 'kind delete cluster --name "$cluster" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
kind create cluster --name "$cluster" --config tests/e2e-kind/kind.yaml --wait 180s
"$engine" build -f deploy/Dockerfile -t continuity:dev .
kind load docker-image continuity:dev --name "$cluster"

kubectl apply -k deploy/k8s
kubectl -n continuity rollout status statefulset/continuity-server --timeout=180s
# The server publishes the bundle itself ([k8s_bundle]); the agents start once it exists.
for _ in $(seq 60); do
  kubectl -n continuity get configmap continuity-bundle -o jsonpath='{.data.bundle\.crt}' 2>/dev/null \
    | grep -q "BEGIN CERTIFICATE" && break
  sleep 2
done
kubectl -n continuity get configmap continuity-bundle -o jsonpath='{.data.bundle\.crt}' | grep -q "BEGIN CERTIFICATE"
kubectl -n continuity rollout status daemonset/continuity-agent --timeout=180s
srv() { kubectl -n continuity exec continuity-server-0 -- continuity-server --socket /run/continuity/private/admin.sock "$@"; }

srv engine create payments --tier 1
srv engine key create payments signing --purpose sign
# Registration through the controller: the ClusterSPIFFEID makes one entry per replica,
# parented to the node alias entry the controller keeps for every node of cluster demo, so the
# agent of whichever node a replica lands on serves it.
kubectl apply -f tests/e2e-kind/payments-clusterspiffeid.yaml
for _ in $(seq 60); do
  srv entry show | grep -q "$alias_id" && break
  sleep 2
done
srv entry show | grep -q "$alias_id" || { echo "the controller made no node alias entry $alias_id"; exit 1; }
kubectl scale deployment/payments --replicas=3
kubectl rollout status deployment/payments --timeout=180s
pods() { kubectl get pods -l app=payments --field-selector=status.phase=Running -o jsonpath='{.items[*].metadata.name}'; }
nodes=$(kubectl get pods -l app=payments -o jsonpath='{.items[*].spec.nodeName}' | tr ' ' '\n' | sort -u | wc -l)
[ "$nodes" -ge 2 ] || { echo "replicas not spread over both workers"; exit 1; }

served() {
  for p in $(pods); do
    kubectl exec "$p" -- continuity-agent api fetch x509 | grep -q "$id" || { echo "$p not served"; return 1; }
  done
}

echo "1. every replica is $id"
served

echo "2. Engine signatures from each replica verify against one JWKS"
first=""
for p in $(pods); do
  kubectl exec "$p" -- sh -c 'echo hello > /tmp/m && continuity-agent engine sign --key signing --message-file /tmp/m' > "$work/sig.$p"
  kubectl exec "$p" -- continuity-agent engine jwks > "$work/jwks.$p"
  first=${first:-$p}
  cmp "$work/jwks.$first" "$work/jwks.$p"
done
for p in $(pods); do
  kubectl exec -i "$first" -- sh -c 'cat > /tmp/sig' < "$work/sig.$p"
  kubectl exec "$first" -- continuity-agent engine verify --key signing --message-file /tmp/m --signature-file /tmp/sig
done

echo "3. deleting an agent pod, then the server pod, keeps workloads served"
agent=$(kubectl -n continuity get pods -l app.kubernetes.io/name=continuity-agent -o jsonpath='{.items[0].metadata.name}')
kubectl -n continuity delete pod "$agent" --wait=true
kubectl -n continuity rollout status daemonset/continuity-agent --timeout=180s
served
kubectl -n continuity delete pod continuity-server-0 --wait=false
served
kubectl -n continuity rollout status statefulset/continuity-server --timeout=180s
served
echo "e2e-kind: all checks passed"
