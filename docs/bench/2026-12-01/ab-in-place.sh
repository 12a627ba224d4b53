#!/bin/bash
# In-place A/B of the eBPF vxlan fast path against the kernel's VXLAN, in one running lab.
#
# Why: rows of `cargo xtask bench` are set up one after another, and this VM's speed
# drifts by ±25 % over minutes, so a few percent between two rows is noise. Here the same
# topology and the same flanneld carry both sides, alternated every few seconds: writing a
# zero PublicIP into each host's pinned FLANNEL_CONFIG makes encap pass (no_config) and
# decap see "not ours", so the kernel's flannel.1 does both; writing the saved value back
# restores the fast path.
#
# Usage, as root, with a lab of two hosts running in another terminal
# (`cargo xtask lab --hosts 2 --containers 1 --dataplane ebpf`):
#   ab-in-place.sh [--offloads on|off] [--rounds N] [--seconds S]
# It only touches the lab's namespaces and pins, and leaves the fast path on.
set -euo pipefail
offloads=on rounds=5 secs=5
while [ $# -gt 0 ]; do
  case $1 in
    --offloads) offloads=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --seconds) secs=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
pid=$(ip netns list | sed -n 's/^fllab-ul-\([0-9]*\).*/\1/p' | head -1)
[ -n "$pid" ] || { echo "no lab is running (no fllab-ul-* namespace)" >&2; exit 1; }
pins=$(echo /tmp/fllab-"$pid"-*/bpffs)
c1=fllab-h1c1-$pid c2=fllab-h2c1-$pid
dst=$(ip netns exec "$c2" ip -4 -br addr show eth0 | awk '{print $3}' | cut -d/ -f1)

declare -A saved zeroed
for h in h1 h2; do
  map=$pins/$h/v3/FLANNEL_CONFIG
  [ -e "$map" ] || { echo "$map missing: is the lab on --dataplane ebpf?" >&2; exit 1; }
  saved[$h]=$(bpftool -j map dump pinned "$map" | python3 -c \
    'import json,sys; print(" ".join(json.load(sys.stdin)[0]["value"]))')
  zeroed[$h]=$(echo "${saved[$h]}" | awk '{$1=$2=$3=$4="0"; print}')
done
config() { for h in h1 h2; do
  bpftool map update pinned "$pins/$h/v3/FLANNEL_CONFIG" key 0 0 0 0 value $([ "$1" = ebpf ] && echo "${saved[$h]}" || echo "${zeroed[$h]}")
done; }
trap 'config ebpf' EXIT

state=$([ "$offloads" = on ] && echo on || echo off)
for ns in fllab-h1-$pid fllab-h2-$pid "$c1" "$c2" fllab-ul-$pid; do
  for dev in $(ip netns exec "$ns" ls /sys/class/net); do
    case $dev in eth*|vc*|p[0-9]*) ip netns exec "$ns" ethtool -K "$dev" tso "$state" gso "$state" gro off 2>/dev/null || true ;; esac
  done
done

ofo() { ip netns exec "$c2" nstat -az TcpExtTCPOFOQueue | awk '$1=="TcpExtTCPOFOQueue"{print $2}'; }
iperf() {
  local before; before=$(ofo)
  ip netns exec "$c2" taskset -c 1 iperf3 -s -D -1; sleep 0.5
  ip netns exec "$c1" taskset -c 0 iperf3 -c "$dst" -t "$secs" -J | python3 -c \
    'import json,sys; e=json.load(sys.stdin)["end"]["sum_sent"]; print("%.2f Gbit/s, %d retransmits" % (e["bits_per_second"]/1e9, e["retransmits"]), end="")'
  echo ", $(( $(ofo) - before )) out-of-order at c2"
}
ip netns exec "$c2" taskset -c 1 qperf >/dev/null 2>&1 &
sleep 0.5
lat() { ip netns exec "$c1" taskset -c 0 qperf -t 3 "$dst" tcp_lat | awk '/latency/{print $3, $4}'; }

echo "offloads $offloads, $rounds rounds, iperf3 -t $secs, qperf tcp_lat -t 3"
for i in $(seq "$rounds"); do
  for side in ebpf kernel; do
    config "$side"
    printf '%-6s iperf3 %s; tcp_lat %s\n' "$side" "$(iperf)" "$(lat)"
  done
done
ip netns pids "$c2" | xargs -r kill
