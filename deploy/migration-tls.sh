#!/usr/bin/env bash
# Certificates for live migration over TLS (drivers/qemu/migrationTls.ts), with openssl:
#   migration-tls.sh ca CA_DIR [CLUSTER_NAME]        the cluster's CA (ca-key.pem stays in CA_DIR, root only)
#   migration-tls.sh host CA_DIR HOST OUT_DIR [IP...] one host's credentials, as QEMU's tls-creds-x509 reads them
# A host's certificate is CN=<HOST> (the identity a migration target requires of its source), names HOST
# and its IPs in its SAN (what a source checks of its target), and serves both ends (serverAuth and
# clientAuth). OUT_DIR gets ca-cert.pem, server-cert.pem/server-key.pem and the same pair as client-*.pem;
# the key is readable by QEMU's account (VSP_QEMU_USER, default vsp-qemu) and root only. Idempotent: an
# existing CA is kept, and an existing host certificate is kept while the CA still verifies it.
set -euo pipefail

DAYS_CA=3650
DAYS_HOST=825
QEMU_USER="${VSP_QEMU_USER:-vsp-qemu}"

die() {
  echo "migration-tls: $*" >&2
  exit 2
}
usage() { die "usage: $0 ca CA_DIR [CLUSTER_NAME] | $0 host CA_DIR HOST OUT_DIR [IP...]"; }

command -v openssl >/dev/null 2>&1 || die "openssl not found (apt-get install openssl)"

make_ca() {
  local dir="$1" name="${2:-vsp}"
  [[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || die "cluster name '$name' must be letters, digits, . _ -"
  mkdir -p "$dir"
  if [ -s "$dir/ca-cert.pem" ] && [ -s "$dir/ca-key.pem" ]; then
    echo "$dir"
    return
  fi
  (
    umask 077
    openssl req -x509 -new -noenc -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha256 -days "$DAYS_CA" \
      -subj "/CN=VSP migration CA $name" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -keyout "$dir/ca-key.pem.tmp" -out "$dir/ca-cert.pem.tmp" 2>/dev/null
  ) || die "openssl could not create the CA in $dir"
  chmod 644 "$dir/ca-cert.pem.tmp"
  mv "$dir/ca-key.pem.tmp" "$dir/ca-key.pem"
  mv "$dir/ca-cert.pem.tmp" "$dir/ca-cert.pem"
  echo "$dir"
}

make_host() {
  local ca="$1" host="$2" out="$3"
  shift 3
  [[ "$host" =~ ^[a-z0-9][a-z0-9-]*$ ]] || die "host name '$host' must be lower-case letters, digits and -"
  [ -s "$ca/ca-cert.pem" ] && [ -s "$ca/ca-key.pem" ] || die "no CA in $ca: run '$0 ca $ca' first"
  local san="DNS:$host" ip
  for ip in "$@"; do
    [[ "$ip" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || die "'$ip' is not an IPv4 address"
    san="$san,IP:$ip"
  done
  mkdir -p "$out"
  if [ -s "$out/server-cert.pem" ] && [ -s "$out/server-key.pem" ] &&
    openssl verify -CAfile "$ca/ca-cert.pem" "$out/server-cert.pem" >/dev/null 2>&1 &&
    cmp -s "$ca/ca-cert.pem" "$out/ca-cert.pem"; then
    echo "$out"
    return
  fi
  local tmp
  tmp="$(mktemp -d "$out/.new.XXXXXX")"
  trap 'rm -rf "$tmp"' RETURN
  (
    umask 077
    openssl req -new -noenc -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha256 -subj "/CN=$host" \
      -keyout "$tmp/key.pem" -out "$tmp/req.pem" 2>/dev/null
    openssl x509 -req -in "$tmp/req.pem" -CA "$ca/ca-cert.pem" -CAkey "$ca/ca-key.pem" -CAcreateserial \
      -CAserial "$tmp/ca.srl" -sha256 -days "$DAYS_HOST" -out "$tmp/cert.pem" -extfile <(
        printf '%s\n' 'basicConstraints=critical,CA:FALSE' \
          'keyUsage=critical,digitalSignature,keyEncipherment' \
          'extendedKeyUsage=serverAuth,clientAuth' "subjectAltName=$san"
      ) 2>/dev/null
  ) || die "openssl could not create the certificate of $host"
  # QEMU reads the key as its own unprivileged account; nobody else may.
  local group=root
  getent group "$QEMU_USER" >/dev/null 2>&1 && group="$(id -gn "$QEMU_USER")"
  chgrp "$group" "$tmp/key.pem"
  chmod 640 "$tmp/key.pem"
  chmod 644 "$tmp/cert.pem"
  cp "$ca/ca-cert.pem" "$tmp/ca-cert.pem"
  chmod 644 "$tmp/ca-cert.pem"
  cp -p "$tmp/key.pem" "$tmp/client-key.pem"
  cp -p "$tmp/cert.pem" "$tmp/client-cert.pem"
  local f
  for f in ca-cert.pem client-key.pem client-cert.pem; do mv "$tmp/$f" "$out/$f"; done
  mv "$tmp/key.pem" "$out/server-key.pem"
  mv "$tmp/cert.pem" "$out/server-cert.pem"
  chmod 755 "$out"
  echo "$out"
}

[ $# -ge 1 ] || usage
case "$1" in
  ca)
    [ $# -ge 2 ] && [ $# -le 3 ] || usage
    make_ca "$2" "${3:-}"
    ;;
  host)
    [ $# -ge 4 ] || usage
    make_host "${@:2}"
    ;;
  *) usage ;;
esac
