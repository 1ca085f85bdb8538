#!/usr/bin/env bash
# Prints the Secret `form-keys` (JSON) the manifests mount: a node key per form-state
# replica (form-state-0.key ...), the authorized keys file listing them, and an API
# tokens file (admin and read). Keep its output out of version control.
#
# usage: deploy/k8s/make-secret.sh [BIN_DIR] > secret.json && kubectl apply -f secret.json
#   BIN_DIR  where form-state and formctl are (default target/release)
set -euo pipefail
bin=${1:-target/release}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
replicas=()
for i in 0 1 2; do
    replicas+=(--replica "form-state-$i=$tmp/form-state-$i")
done
"$bin/formctl" keys --form-state "$bin/form-state" "${replicas[@]}" \
    --out "$tmp/authorized_keys" --tokens-dir "$tmp" >/dev/null
for i in 0 1 2; do
    cp "$tmp/form-state-$i/node.key" "$tmp/form-state-$i.key"
done
python3 - "$tmp" <<'PY'
import base64, json, sys
d = sys.argv[1]
files = ["authorized_keys", "tokens"] + [f"form-state-{i}.key" for i in range(3)]
data = {f: base64.b64encode(open(f"{d}/{f}", "rb").read()).decode() for f in files}
print(json.dumps({"apiVersion": "v1", "kind": "Secret",
                  "metadata": {"name": "form-keys", "namespace": "form"},
                  "type": "Opaque", "data": data}, indent=2))
PY
