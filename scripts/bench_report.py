"""Turns a bench-compare.sh output directory into docs/benchmarks.md-ready markdown.

Usage: python3 scripts/bench_report.py OUT_DIR PLACEMENT
"""

import glob
import json
import os
import platform
import subprocess
import sys

out, placement = sys.argv[1], sys.argv[2]


def load(path):
    with open(path) as f:
        return json.load(f)


def reports(directory):
    rs = []
    for p in sorted(glob.glob(os.path.join(directory, "*.json"))):
        if p.endswith("all.json"):
            continue
        r = load(p)
        if isinstance(r, dict) and "outcome" in r:
            rs.append(r)
    return rs


def find(rs, scenario, broker):
    for r in rs:
        if r["scenario"]["name"] == scenario and r["broker"] == broker:
            return r
    return None


def num(x):
    if x is None:
        return "–"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e4:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def cpu_model():
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def ordered(directory):
    """Reports in the order the comparison ran them (all.json), else by file name."""
    path = os.path.join(directory, "all.json")
    if os.path.exists(path):
        return load(path)
    return reports(directory)


rs = ordered(out)
half = ordered(os.path.join(out, "half-rate"))
def load_if_present(name):
    path = os.path.join(out, name)
    return load(path) if os.path.exists(path) else None


raw = load_if_present("p2p-qos0-raw-forwarder.json")
half_raw = load_if_present("half-rate-raw-forwarder.json")
brokers = []
for r in rs:
    if r["broker"] not in brokers:
        brokers.append(r["broker"])
scenarios = []
for r in rs:
    if r["scenario"]["name"] not in scenarios:
        scenarios.append(r["scenario"]["name"])

print(f"### Placement: {placement}")
print()
print(f"Machine: {os.cpu_count()} CPUs ({cpu_model()}), Linux {platform.release()}. "
      f"Command: `scripts/bench-compare.sh {placement}`. Every figure below comes from one run; "
      "brokers ran one after another on the same load.")
print()
print("| scenario | " + " | ".join(f"{b} msgs/s out" for b in brokers) + " | " +
      " | ".join(f"shardmq / {b}" for b in brokers if b != "shardmq") + " | lost (per broker) |")
print("|---|" + "---|" * (2 * len(brokers) - 1) + "---|")
for sc in scenarios:
    row = [find(rs, sc, b) for b in brokers]
    if not row[0] or row[0]["outcome"]["kind"] != "pubsub":
        continue
    vals = [r["outcome"]["rate_out"] if r else None for r in row]
    ratios = []
    for b, v in zip(brokers, vals):
        if b == "shardmq":
            continue
        ratios.append(f"{vals[0] / v:.2f}×" if v and vals[0] else "–")
    lost = " / ".join(str(r["outcome"]["delivery"]["lost"]) if r else "–" for r in row)
    print(f"| {sc} | " + " | ".join(num(v) for v in vals) + " | " + " | ".join(ratios) + f" | {lost} |")
print()

print("End-to-end latency in the max-throughput runs (µs; closed loop, so latency ≈ messages in flight ÷ rate):")
print()
print("| scenario | broker | p50 | p99 | p99.9 | max |")
print("|---|---|---|---|---|---|")
for sc in scenarios:
    for b in brokers:
        r = find(rs, sc, b)
        if r and r["outcome"]["kind"] == "pubsub":
            l = r["outcome"]["latency"]
            print(f"| {sc} | {b} | {l['p50_us']:.0f} | {l['p99_us']:.0f} | {l['p999_us']:.0f} | {l['max_us']:.0f} |")
print()

for r in rs:
    if r["outcome"]["kind"] == "conn" and r["broker"] == brokers[0]:
        sc = r["scenario"]["name"]
        print(f"Idle connections (`{sc}`: {r['scenario']['connections']} connections; RSS growth from before "
              "connecting to 3 s after the last CONNACK, per connection):")
        print()
        print("| broker | bytes per connection | connections/s | CONNACK p99 µs | opened |")
        print("|---|---|---|---|---|")
        for b in brokers:
            c = find(rs, sc, b)
            if c:
                o = c["outcome"]
                per = o["rss_per_connection"]
                print(f"| {b} | {per:.0f} | {o['connect_rate']:.0f} | {o['connack']['p99_us']:.0f} | {o['opened']}/{o['connections']} |"
                      if per is not None else f"| {b} | – | {o['connect_rate']:.0f} | {o['connack']['p99_us']:.0f} | {o['opened']}/{o['connections']} |")
        print()

if raw:
    s = find(rs, "p2p-qos0", "shardmq")
    fr = raw["outcome"]["rate_out"]
    print(f"Raw-limit baseline: the same p2p QoS 0 load through `shardmq-bench forwarder` (bytes copied "
          f"between paired sockets, no MQTT logic): {num(fr)} msgs/s.")
    if s:
        print(f"ShardMQ p2p QoS 0 reaches **{100 * s['outcome']['rate_out'] / fr:.0f} %** of it.")
    print()

if half:
    sc = half[0]["scenario"]
    total = sc["rate"] * sc["publishers"]
    print(f"Latency at half of Mosquitto's max p2p QoS 0 rate ({num(total)} msgs/s in total, "
          f"{sc['rate']} msgs/s per publisher, open loop):")
    print()
    print("| broker | msgs/s out | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | lost |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [(b, find(half, sc["name"], b)) for b in brokers]
    if half_raw:
        rows.append(("raw forwarder (no MQTT)", half_raw))
    for b, r in rows:
        if r:
            o = r["outcome"]
            l = o["latency"]
            print(f"| {b} | {num(o['rate_out'])} | {l['p50_us']:.0f} | {l['p90_us']:.0f} | {l['p99_us']:.0f} | "
                  f"{l['p999_us']:.0f} | {l['max_us']:.0f} | {o['delivery']['lost']} |")
    print()
    if half_raw:
        print("The raw forwarder's row is the floor of this load generator, kernel and machine at "
              "that rate: the same sockets and load with no MQTT logic in between.")
        print()
