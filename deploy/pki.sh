#!/bin/sh
# Certificates and SuperNode keys for a bridgepool federation (TLS + SuperNode authentication).
#
#   sh deploy/pki.sh OUT CENTRE...            e.g. sh deploy/pki.sh pki fr-genci de-lrz es-bsc
#   SUPERLINK_SANS="DNS:superlink,DNS:localhost,IP:127.0.0.1,IP:10.77.0.1" sh deploy/pki.sh ...
#
# Writes (nothing that exists is regenerated, so it is safe to run on every `docker compose up`):
#   OUT/ca/ca.key, ca.crt                   the CA; its key never leaves this directory
#   OUT/server/ca.crt, server.crt, .key     the SuperLink's TLS certificate (SANs: SUPERLINK_SANS)
#   OUT/public/ca.crt, CENTRE.pub           what the SuperLink operator needs: CA and public keys
#   OUT/centres/CENTRE/ca.crt, supernode.key, supernode.key.pub
#                                           one centre's SuperNode identity; only that centre mounts it
# SuperNode keys are ECDSA P-384 in OpenSSH format: flower-supernode loads them with
# load_ssh_private_key and accepts only elliptic-curve keys; `flwr supernode register` takes the .pub.
# Needs openssl and ssh-keygen (Debian: openssl, openssh-client).
set -eu
[ $# -ge 1 ] || { echo "usage: $0 OUT [CENTRE...]" >&2; exit 2; }
out=$1
shift
sans=${SUPERLINK_SANS:-DNS:superlink,DNS:localhost,IP:127.0.0.1}
days=${PKI_DAYS:-825}
umask 077
mkdir -p "$out/ca" "$out/server" "$out/public"

if [ ! -s "$out/ca/ca.crt" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -sha384 -days "$days" \
    -keyout "$out/ca/ca.key" -out "$out/ca/ca.crt" -subj "/CN=bridgepool federation CA" 2>/dev/null
fi

if [ ! -s "$out/server/server.crt" ]; then
  ext="$out/server/server.ext"
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth" "subjectAltName=$sans" "subjectKeyIdentifier=hash" \
    "authorityKeyIdentifier=keyid,issuer" > "$ext"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -sha384 \
    -keyout "$out/server/server.key" -out "$out/server/server.csr" -subj "/CN=superlink" 2>/dev/null
  openssl x509 -req -sha384 -days "$days" -in "$out/server/server.csr" -CA "$out/ca/ca.crt" \
    -CAkey "$out/ca/ca.key" -CAcreateserial -extfile "$ext" -out "$out/server/server.crt" 2>/dev/null
  rm -f "$out/server/server.csr" "$ext"
fi

for centre in "$@"; do
  dir="$out/centres/$centre"
  mkdir -p "$dir"
  if [ ! -s "$dir/supernode.key" ]; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "$centre" -f "$dir/supernode.key"
  fi
  cp "$out/ca/ca.crt" "$dir/ca.crt"
  cp "$dir/supernode.key.pub" "$out/public/$centre.pub"
done
cp "$out/ca/ca.crt" "$out/server/ca.crt"
cp "$out/ca/ca.crt" "$out/public/ca.crt"
# Public parts are world-readable; private keys stay 0600 (umask above).
chmod 0644 "$out/server/ca.crt" "$out/server/server.crt" "$out/public/"* 2>/dev/null || true
for centre in "$@"; do chmod 0644 "$out/centres/$centre/ca.crt" "$out/centres/$centre/supernode.key.pub"; done
for d in "$out/server" "$out/public" "$out/centres" "$out/centres/"*; do [ -d "$d" ] && chmod 0755 "$d"; done
echo "pki: $out ready (SuperLink certificate SANs: $(openssl x509 -in "$out/server/server.crt" -noout -ext subjectAltName | tail -n 1 | tr -d ' '); centres: ${*:-none})"
