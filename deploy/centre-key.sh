#!/bin/sh
# A centre's own SuperNode key pair, made at the centre: the private key never leaves DIR.
#
#   sh deploy/centre-key.sh DIR CENTRE [OUTBOX]       e.g. sh deploy/centre-key.sh /srv/bridgepool/pki fr-genci
#
# Writes (an existing key is kept, so it is safe to run again):
#   DIR/supernode.key       the private key, 0600: only this centre's SuperNode reads it
#   DIR/supernode.key.pub   the public half: the only file the centre hands to the coordinator
#   OUTBOX/CENTRE.pub       with OUTBOX, a copy of the public half placed for hand-over
# The coordinator registers it with `sh deploy/pki.sh OUT CENTRE=PATH/TO/CENTRE.pub` and sends back
# its CA certificate (OUT/public/ca.crt), which the SuperNode verifies the SuperLink with.
# ECDSA P-384 in OpenSSH format: flower-supernode loads it with load_ssh_private_key and accepts
# only elliptic-curve keys. Needs ssh-keygen (Debian: openssh-client).
set -eu
[ $# -ge 2 ] && [ $# -le 3 ] || { echo "usage: $0 DIR CENTRE [OUTBOX]" >&2; exit 2; }
dir=$1
centre=$2
case $centre in
  *[!A-Za-z0-9._-]*|""|.|..) echo "centre-key: centre name '$centre' must be letters, digits, . _ -" >&2; exit 2 ;;
esac
umask 077
mkdir -p "$dir"
if [ ! -s "$dir/supernode.key" ]; then
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "$centre" -f "$dir/supernode.key"
fi
chmod 0600 "$dir/supernode.key"
chmod 0644 "$dir/supernode.key.pub"
if [ $# -eq 3 ]; then
  mkdir -p "$3"
  cp "$dir/supernode.key.pub" "$3/$centre.pub"
  chmod 0644 "$3/$centre.pub"
fi
echo "centre-key: $centre's key pair in $dir; hand over only $dir/supernode.key.pub$([ $# -eq 3 ] && echo " (copied to $3/$centre.pub)")"
