#!/usr/bin/env bash
# One simulated host's part of a Ray cluster, for `tandem testbed --hosts H -- ray_node.sh {rank}
# {world} {addr} {addr0} ARGS...`: host 0 starts the head and runs `ps_ray.py ARGS <head> H` (its
# CSV line on stdout), the others join the head one after the other (nodes of one machine share the
# head's session folder, and two joining at once can pick the same socket name) and leave when the
# head is gone. Every wait is bounded; every Ray process this host started is stopped on exit.
set -euo pipefail
rank=$1 world=$2 addr=$3 addr0=$4; shift 4
here=$(cd "$(dirname "$0")" && pwd)
port=6379
turns="/tmp/tandem-ray-turns-$addr0"
common=(--node-ip-address="$addr" --num-cpus=8 --resources="{\"tandem_host_$rank\": 1000}" --disable-usage-stats)
log=$(mktemp)
stop() { ray stop --force >/dev/null 2>&1 || true; rm -f "$log"; [ "$rank" != 0 ] || rm -rf "$turns" "$tmp"; }
trap stop EXIT
wait_for() { # wait_for WHAT SECONDS TEST...: bounded wait for a condition
  local what=$1 secs=$2; shift 2
  for _ in $(seq $((secs * 2))); do "$@" 2>/dev/null && return 0; sleep 0.5; done
  echo "ray_node.sh: host $rank: no $what within $secs s" >&2; return 1
}
if [ "$rank" = 0 ]; then
  rm -rf "$turns"; mkdir -p "$turns"
  tmp=$(mktemp -d /tmp/tandem-ray-XXXXXX)
  ray start --head --port=$port --include-dashboard=false --temp-dir="$tmp" "${common[@]}" >"$log" 2>&1 ||
    { cat "$log" >&2; exit 1; }
  touch "$turns/0"
  python3 "$here/ps_ray.py" "$@" "$addr:$port" "$world"
else
  wait_for "turn to join (host $((rank - 1)) joined)" 120 test -e "$turns/$((rank - 1))"
  ray start --address="$addr0:$port" "${common[@]}" >"$log" 2>&1 ||
    { echo "ray_node.sh: host $rank could not join the head at $addr0:$port" >&2; cat "$log" >&2; exit 1; }
  touch "$turns/$rank"
  # Leave when the head is gone (bounded: 30 minutes).
  for _ in $(seq 1800); do
    timeout 2 bash -c "exec 3<>/dev/tcp/$addr0/$port" 2>/dev/null || break
    sleep 1
  done
fi
