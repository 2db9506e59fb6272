#!/bin/sh
# The coordinator's side of a bridgepool federation's PKI: the CA, the SuperLink's TLS certificate,
# and the registry of the centres' PUBLIC keys. It never makes or sees a centre's private key: each
# centre makes its own pair with deploy/centre-key.sh and hands over only the public half.
#
#   SUPERLINK_SANS="DNS:superlink" sh deploy/pki.sh OUT [CENTRE=PUBKEY...]
#   e.g. SUPERLINK_SANS="DNS:link.example.org" sh deploy/pki.sh pki fr-genci=inbox/fr-genci.pub
#
# SUPERLINK_SANS (required): the names and addresses the SuperLink is reached at, and nothing else.
# Writes (nothing that exists is regenerated, so it is safe to run on every `docker compose up`):
#   OUT/ca/ca.key, ca.crt                   the CA (basicConstraints CA:TRUE pathlen:0, keyUsage
#                                           keyCertSign+cRLSign, both critical); its key never leaves ca/
#   OUT/server/ca.crt, server.crt, .key     the SuperLink's TLS certificate (SANs: SUPERLINK_SANS)
#   OUT/public/ca.crt, CENTRE.pub           public only: the CA certificate the centres verify the
#                                           SuperLink with, and the keys to register (deploy register)
# Needs openssl and ssh-keygen (Debian: openssl, openssh-client).
set -eu
[ $# -ge 1 ] || { echo "usage: SUPERLINK_SANS=DNS:host[,IP:addr] $0 OUT [CENTRE=PUBKEY...]" >&2; exit 2; }
out=$1
shift
sans=${SUPERLINK_SANS:?pki: set SUPERLINK_SANS to the names the SuperLink is reached at, e.g. DNS:superlink}
days=${PKI_DAYS:-825}
for arg in "$@"; do  # check every key before writing anything
  centre=${arg%%=*}
  key=${arg#*=}
  case $arg in
    *=*) ;;
    *) echo "pki: '$arg' is not CENTRE=PUBKEY; centres make their own keys (sh deploy/centre-key.sh DIR CENTRE)" \
            "and hand over only the public half" >&2; exit 2 ;;
  esac
  case $centre in
    *[!A-Za-z0-9._-]*|""|.|..) echo "pki: centre name '$centre' must be letters, digits, . _ -" >&2; exit 2 ;;
  esac
  [ -s "$key" ] || { echo "pki: public key $key of $centre not found" >&2; exit 2; }
  if grep -q "PRIVATE KEY" "$key"; then
    echo "pki: $key is a PRIVATE key; refusing it. $centre must hand over only supernode.key.pub" >&2; exit 2
  fi
  ssh-keygen -l -f "$key" 2>/dev/null | grep -q "(ECDSA)" || {
    echo "pki: $key is not an ECDSA OpenSSH public key (make it with deploy/centre-key.sh)" >&2; exit 2; }
done
umask 077
mkdir -p "$out/ca" "$out/server" "$out/public"

if [ ! -s "$out/ca/ca.crt" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -sha384 -days "$days" \
    -keyout "$out/ca/ca.key" -out "$out/ca/ca.crt" -subj "/CN=bridgepool federation CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" 2>/dev/null
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

for arg in "$@"; do
  cp "${arg#*=}" "$out/public/${arg%%=*}.pub"
done
cp "$out/ca/ca.crt" "$out/server/ca.crt"
cp "$out/ca/ca.crt" "$out/public/ca.crt"
# Public parts are world-readable; private keys stay 0600 (umask above).
chmod 0644 "$out/server/ca.crt" "$out/server/server.crt" "$out/public/"*
chmod 0755 "$out/server" "$out/public"
names=""
for arg in "$@"; do names="$names ${arg%%=*}"; done
echo "pki: $out ready (SuperLink certificate SANs: $(openssl x509 -in "$out/server/server.crt" -noout -ext subjectAltName | tail -n 1 | tr -d ' '); public keys registered:${names:- none})"
