#!/bin/sh
# Debian packages bridgepool uses: man pages in several languages are the default
# centre corpora (real human prose, no download at run time); Prometheus and
# tcpdump serve the metrics and `bridgepool verify residency`, tshark decrypts the TLS it
# captures in the network-namespace topology (deploy/residency/tls.py); openssl and openssh-client (ssh-keygen)
# make the TLS certificates and SuperNode keys (deploy/pki.sh); iproute2 and util-linux the
# namespace hosts (deploy/netns.py). Installs only what is missing.
#   sh deploy/install-system-packages.sh          # what the demo and the tests need
#   sh deploy/install-system-packages.sh docker   # also a Docker engine, Compose v1 and debootstrap:
#       tests/test_compose_up.py and `bridgepool deploy up --offline` (.ci/run installs them)
set -eu
PKGS="manpages manpages-fr manpages-de manpages-es prometheus tcpdump tshark iproute2 openssl openssh-client util-linux"
if [ "${1:-}" = docker ]; then
  PKGS="$PKGS docker.io docker-compose debootstrap"
fi
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "bridgepool needs these Debian packages:$missing" >&2
  echo "install them with: sudo apt-get install -y$missing" >&2
  exit 1
fi
echo "installing Debian packages:$missing"
export DEBIAN_FRONTEND=noninteractive
# tshark's wireshark-common asks whether non-root users may capture: no (nothing here needs it).
echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null
