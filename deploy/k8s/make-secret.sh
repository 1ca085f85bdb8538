#!/usr/bin/env bash
# Prints the Secrets (a JSON List) the manifests mount:
# - `form-keys`: the authorized keys file listing the replicas' public keys, and an API
#   tokens file (admin and read), mounted only where form-mcp and the demo job run;
# - `form-state-{i}` for i in 0 1 2: one replica's own node key (node.key) and TLS
#   files (ca.pem, cert.pem, key.pem), mounted by that replica's pod only;
# - `form-vmm-{i}` for i below FORM_VMM_NODES (2): one vmm node's own TLS files, so
#   each node has an identity of its own (the first to write a node record keeps it);
# - `form-tls`: the TLS files of the other services (<id>.ca.pem, <id>.cert.pem,
#   <id>.key.pem), each workload mounting only its own items, and the balancers'
#   session cookie key (form-rplb.cookie-key), one for every form-rplb pod, kept in the
#   CA directory (cookie.key) so that a session pinned by one pod is honored by the
#   others and by the next run's Secret.
# Certificates are issued by a CA kept in ${FORM_CA_DIR:-./form-ca} (made there the
# first time; its key never goes into a Secret). Keep the output and the CA out of
# version control.
#
# The certificates last FORM_CERT_HOURS (720) hours: run the script again and apply
# its output before then; the services take the renewed files in without a restart.
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
ca=${FORM_CA_DIR:-./form-ca}
mkdir -p "$ca" "$tmp/tls"
# The balancers' cookie key is kept beside the CA, so a renewal keeps sessions pinned.
"$bin/formctl" keys --form-state "$bin/form-state" "${replicas[@]}" \
    --out "$tmp/authorized_keys" --tokens-dir "$tmp" --cookie-key "$ca/cookie.key" >/dev/null
cp "$ca/cookie.key" "$tmp/tls/form-rplb.cookie-key"
cp -r "$ca/." "$tmp/tls/ca" 2>/dev/null || true
nodes=${FORM_VMM_NODES:-2}
vmm=()
for ((i = 0; i < nodes; i++)); do vmm+=("form-vmm-$i=vmm"); done
holders=(form-state-0=state form-state-1=state form-state-2=state "${vmm[@]}"
         form-rplb=rplb form-scaler=scaler form-mcp=gateway)
args=()
for h in "${holders[@]}"; do args+=(--holder "$h"); done
"$bin/formctl" certs stack --dir "$tmp/tls" --lifetime-hours "${FORM_CERT_HOURS:-720}" \
    "${args[@]}" >/dev/null
cp "$tmp/tls/ca/ca.pem" "$tmp/tls/ca/ca-key.pem" "$ca/"
python3 - "$tmp" "${holders[@]%%=*}" <<'PY'
import base64, json, sys
d, ids = sys.argv[1], sys.argv[2:]
b64 = lambda p: base64.b64encode(open(p, "rb").read()).decode()
pems = ("ca.pem", "cert.pem", "key.pem")
keys = {f: b64(f"{d}/{f}") for f in ("authorized_keys", "tokens")}
replicas = [f"form-state-{i}" for i in range(3)]
nodes = [i for i in ids if i.startswith("form-vmm-")]
own = {r: {"node.key": b64(f"{d}/{r}/node.key"),
           **{f: b64(f"{d}/tls/{r}/{f}") for f in pems}} for r in replicas}
own.update({n: {f: b64(f"{d}/tls/{n}/{f}") for f in pems} for n in nodes})
tls = {f"{i}.{f}": b64(f"{d}/tls/{i}/{f}") for i in ids if i not in own for f in pems}
tls["form-rplb.cookie-key"] = b64(f"{d}/tls/form-rplb.cookie-key")
secret = lambda name, data: {"apiVersion": "v1", "kind": "Secret",
                             "metadata": {"name": name, "namespace": "form"},
                             "type": "Opaque", "data": data}
items = [secret("form-keys", keys), secret("form-tls", tls)]
items += [secret(r, own[r]) for r in replicas + nodes]
print(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}, indent=2))
PY
