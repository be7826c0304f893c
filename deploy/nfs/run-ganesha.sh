#!/bin/sh
# Runs rpcbind + nfs-ganesha for one host's NFS export, in the foreground, as one process group:
#   run-ganesha.sh CONFIG LOG PIDFILE
# Several test hosts share one machine, and rpcbind's socket and lock live in /run, so each instance
# gets a private /run (a tmpfs in its own mount namespace): the real /run is never touched.
set -eu
if [ "${VSP_GANESHA_PRIVATE_RUN:-}" != 1 ]; then
  export VSP_GANESHA_PRIVATE_RUN=1
  exec unshare --mount --propagation private "$0" "$@"
fi
[ $# -eq 3 ] || { echo "usage: $0 CONFIG LOG PIDFILE" >&2; exit 2; }
mount -t tmpfs -o size=4m,mode=755 vsp-nfs-run /run
mkdir -p /run/rpcbind
rpcbind -f -w &
RPCBIND=$!
trap 'kill $RPCBIND 2>/dev/null' EXIT
trap 'exit 143' TERM INT
i=0
while [ ! -S /run/rpcbind.sock ]; do
  i=$((i + 1))
  [ $i -gt 100 ] && { echo "rpcbind did not start" >&2; exit 1; }
  sleep 0.05
done
# Not exec: the shell stays to stop rpcbind when ganesha ends.
ganesha.nfsd -F -f "$1" -L "$2" -p "$3" -N NIV_EVENT &
GANESHA=$!
trap 'kill $GANESHA 2>/dev/null; wait $GANESHA; exit 143' TERM INT
wait $GANESHA
