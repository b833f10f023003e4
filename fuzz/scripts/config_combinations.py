#!/usr/bin/env python3
"""Writes configs that combine the keys of sites, devices, Modbus links, device rules,
MQTT users, API tokens and webhooks, for merging into the `config` corpus.

The checks of a config look at entries together. A device's site must be declared, and
its rule must name a metric of its profile with a matching kind. Its Modbus link must not
mix serial and TCP keys, and an MQTT user may not take a device's id. Changing one key of the
example config at a time, as `toml_variants.py` does, rarely brings two such keys
together. This script draws every key from a list of values (absent, valid, at a limit,
past it, contradicting another key) and writes configs of a few entries each, so that
most pairs of values meet in some file.

Usage: config_combinations.py OUT_DIR [COUNT] [SEED]

COUNT is the number of configs (20,000 by default). SEED makes the output reproducible
(1 by default). OUT_DIR must be new or empty. The metrics of each profile are read from
`device-profiles/`. Merge the output as `docs/testing.md` describes.
"""

import os
import random
import tomllib

import corpus_args

HERE = os.path.dirname(os.path.abspath(__file__))
PROFILES_DIR = os.path.join(HERE, "..", "..", "device-profiles")

HASH = ("$argon2id$v=19$m=19456,t=2,p=1$KPtT85L360xHRgn6+v0R8A$"
        "CV3grsjddblLG6xBJCmhx9IkQUs9AiAVFbuQ2yZL97o")
HASHES = [
    HASH, HASH.replace("argon2id", "argon2i"), HASH.replace("argon2id", "argon2d"),
    "$2b$12$abcdefghijklmnopqrstuu", "$argon2id$v=19$m=19456", "plain", "",
    HASH.replace("argon2id$v=19$m=19456,t=2,p=1", "scrypt$ln=15,r=8,p=1"),
    HASH.replace("argon2id$v=19$m=19456,t=2,p=1", "pbkdf2-sha256$i=1000"),
    "$scrypt$ln=15,r=8,p=1$c2FsdA$aGFzaA", "$argon2id$v=19$m=1,t=1,p=1$$",
]
IDS = ["plant-a", "park-b3", "a", "x" * 64, "x" * 65, "Plant-A", "plant a", "", "-a",
       "a/b", "a+", "site_1", "ünï"]
DURATIONS = ["0s", "1ms", "500ms", "1s", "10s", "2m", "5m", "1h", "30d", "1000y", "5", "x"]


def profiles():
    """Returns {profile name: [(metric, kind)]} of the shipped profiles."""
    result = {}
    for name in sorted(os.listdir(PROFILES_DIR)):
        if name.endswith(".toml"):
            with open(os.path.join(PROFILES_DIR, name), "rb") as f:
                spec = tomllib.load(f)
            result[spec["name"]] = [
                (m["name"], m.get("kind", "number")) for m in spec.get("metrics", [])
            ]
    return result


def maybe(rng, p, text):
    return text if rng.random() < p else None


def quoted(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modbus(rng):
    keep = rng.choice([0.2, 0.5, 1.0])
    transport = rng.choice(["tcp", "rtu", "rtu_over_tcp", "udp"])
    keys = [f'transport = "{transport}"' if rng.random() < 0.95 else None]
    choices = [
        ["address = " + quoted(a) for a in (
            "127.0.0.1:5020", "127.0.0.1", "[::1]:502", "localhost:502", ":502",
            "host:99999", "")],
        ["serial_port = " + quoted(p) for p in ("/dev/ttyUSB0", "")],
        [f"baud_rate = {b}" for b in (0, 9600, 115200)],
        [f'parity = "{p}"' for p in ("none", "even", "odd", "mark")],
        [f"data_bits = {d}" for d in (4, 5, 8, 9)],
        [f"stop_bits = {s}" for s in (0, 1, 2, 3)],
        [f"unit_id = {u}" for u in (0, 1, 247, 248, 255)],
        ["poll_interval = " + quoted(d) for d in ("1ms", "10ms", "5s", "1h")],
        ["timeout = " + quoted(d) for d in ("0s", "1s")],
        [f"retries = {r}" for r in (0, 10, 11)],
        [f"max_gap = {g}" for g in (0, 124, 125)],
        [f"max_registers_per_read = {m}" for m in (0, 1, 125, 126)],
        [f"max_bits_per_read = {m}" for m in (0, 1, 2000, 2001)],
        [f"coalesce = {c}" for c in ("true", "false")],
        ["bus_pause = " + quoted(d) for d in ("0s", "20ms")],
        [f"max_concurrent_requests = {m}" for m in (0, 1, 8)],
        [f"offline_after_failures = {o}" for o in (0, 1, 3, 100000)],
        [f"report_deadband = {d}" for d in ("0", "0.5", "-1", "nan", "inf")],
    ]
    keys += [rng.choice(values) if rng.random() < keep else None for values in choices]
    return "[devices.modbus]\n" + "\n".join(k for k in keys if k)


def device_rule(rng, metrics, index):
    metric, metric_kind = rng.choice(metrics) if metrics and rng.random() < 0.9 else ("nope", "number")
    kind = rng.choice(["above", "below", "equals"] + (["equals"] if metric_kind == "bool" else []))
    lines = ["[[devices.rules]]", f'id = "{rng.choice(["r1", "r2", f"r{index}"])}"',
             f'metric = "{metric}"', f'kind = "{kind}"']
    if kind == "equals":
        lines += [rng.choice(["equals = true", "equals = false", ""]),
                  rng.choice(["", "level = 1", "level = 3", "level1 = 5", "level2 = 5"])]
    else:
        lines += [rng.choice(["level1 = 10", "level2 = 30", "level1 = 10\nlevel2 = 30",
                              "level1 = 30\nlevel2 = 10", "", "level1 = nan", "equals = true"])]
    lines += [rng.choice(["", "deadband = 1.0", "deadband = -1.0", 'min_duration = "10s"'])]
    return "\n".join(line for line in lines if line)


def device(rng, index, site_ids, profile_metrics):
    profile = rng.choice(list(profile_metrics) + ["no-such-profile"])
    lines = ["[[devices]]",
             f'id = {quoted(rng.choice(["dev-1", "dev-2", f"dev-{index}", "dev-1"] + IDS))}',
             f'site = {quoted(rng.choice(site_ids + ["undeclared"]) if site_ids else "plant-a")}',
             f'profile = "{profile}"',
             maybe(rng, 0.3, 'name = "A device"'),
             maybe(rng, 0.4, "stale_after = " + quoted(rng.choice(DURATIONS))),
             maybe(rng, 0.3, "mqtt_password_hash = " + quoted(rng.choice(HASHES)))]
    blocks = ["\n".join(line for line in lines if line)]
    if rng.random() < 0.5:
        blocks.append(modbus(rng))
    metrics = profile_metrics.get(profile, [])
    blocks += [device_rule(rng, metrics, i) for i in range(rng.choice([0, 0, 1, 2]))]
    return "\n".join(blocks)


def site(rng, site_id):
    kind = rng.choice(["enterprise", "park_building", "factory", None])
    lines = ["[[sites]]", f"id = {quoted(site_id)}", maybe(rng, 0.7, 'name = "Site"'),
             f'kind = "{kind}"' if kind else None]
    return "\n".join(line for line in lines if line)


def mqtt_user(rng, names):
    sites = rng.choice([[], ["plant-a"], ["plant-a", "park-b3"], ["undeclared"], ["Bad Id"]])
    lines = ["[[mqtt_users]]", f"username = {quoted(rng.choice(names))}",
             "password_hash = " + quoted(rng.choice(HASHES)),
             "sites = [" + ", ".join(quoted(s) for s in sites) + "]"]
    return "\n".join(lines)


def api_token(rng):
    digest = rng.choice(["41bc9559bafd0613bfba0216b4d2f634a7bdc05997783d5a4eace772824a162a",
                         "41BC9559BAFD0613BFBA0216B4D2F634A7BDC05997783D5A4EACE772824A162A",
                         "abc", "", "zz" * 32])
    lines = ["[[api_tokens]]", f'name = {quoted(rng.choice(["ops", "ops", "viewer-1", "", "a b"]))}',
             f'role = "{rng.choice(["viewer", "operator", "writer", "admin", "root"])}"',
             f"token_sha256 = {quoted(digest)}"]
    return "\n".join(lines)


def webhook(rng):
    url = rng.choice(["https://assistant.example.com/hooks", "http://127.0.0.1:9/x", "ftp://a/b",
                      "https://", "not a url", "https://user:pass@example.com/", ""])
    events = rng.choice([None, [], ["alarm.raised"], ["alarm.raised", "device.offline"],
                         ["alarm.unknown"]])
    lines = ["[[webhooks]]", f'name = {quoted(rng.choice(["app", "app", "", "a b"]))}',
             f"url = {quoted(url)}",
             maybe(rng, 0.4, 'secret = "s3cret"'), maybe(rng, 0.4, 'secret_env = "HOOK_SECRET"'),
             maybe(rng, 0.3, "timeout = " + quoted(rng.choice(DURATIONS))),
             maybe(rng, 0.3, "initial_backoff = " + quoted(rng.choice(DURATIONS))),
             maybe(rng, 0.3, "max_backoff = " + quoted(rng.choice(DURATIONS))),
             None if events is None else "events = [" + ", ".join(quoted(e) for e in events) + "]"]
    return "\n".join(line for line in lines if line)


def clean_config(rng, profile_metrics):
    """Writes a config that passes the checks: one site, and devices with valid keys."""
    blocks = ['[[sites]]\nid = "plant-a"\nname = "Plant A"\nkind = "enterprise"']
    for i in range(rng.randint(1, 3)):
        profile = rng.choice(list(profile_metrics))
        lines = ["[[devices]]", f'id = "dev-{i}"', 'site = "plant-a"', f'profile = "{profile}"']
        metrics = [m for m, kind in profile_metrics[profile] if kind == "number"]
        if metrics and rng.random() < 0.5:
            lines += ["[[devices.rules]]", 'id = "local"', f'metric = "{rng.choice(metrics)}"',
                      'kind = "above"', "level1 = 10", "level2 = 20"]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


ORIGINS = ["https://grafana.example", "http://10.0.0.5:3000", "http://[::1]:3000",
           "https://grafana.example/", "https://*.example", "grafana.example", "ftp://a",
           "https://", "http://a_b", "https://a b", "HTTPS://A.EXAMPLE"]


def config(rng, profile_metrics):
    if rng.random() < 0.1:
        return clean_config(rng, profile_metrics)
    blocks = []
    if rng.random() < 0.2:
        origins = rng.sample(ORIGINS, rng.randint(0, 3))
        blocks.append("[server]\ncors_allowed_origins = [" + ", ".join(quoted(o) for o in origins) + "]")
    if rng.random() < 0.3:
        blocks.append("[ingest]\nstale_after = " + quoted(rng.choice(DURATIONS)))
    if rng.random() < 0.2:
        blocks.append(f"[alarms]\noffline_level = {rng.choice([0, 1, 2, 3])}")
    site_ids = rng.sample(["plant-a", "park-b3", "plant-a", "Bad Id"], rng.randint(0, 3))
    blocks += [site(rng, s) for s in site_ids]
    device_ids = []
    for i in range(rng.randint(1, 4)):
        text = device(rng, i, site_ids, profile_metrics)
        device_ids.append(text.split('id = "', 1)[1].split('"', 1)[0])
        blocks.append(text)
    if rng.random() < 0.4:
        names = ["grafana", "grafana", "Bad Name"] + device_ids
        blocks += [mqtt_user(rng, names) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.3:
        blocks += [api_token(rng) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.3:
        blocks += [webhook(rng) for _ in range(rng.randint(1, 2))]
    return "\n\n".join(blocks) + "\n"


def main():
    parser = corpus_args.parser("Writes configs that combine the keys of their entries.")
    args = parser.parse_args()
    corpus_args.create_out_dir(parser, args.out_dir)
    rng = random.Random(args.seed)
    profile_metrics = profiles()
    corpus_args.write_numbered(args.out_dir, args.count, lambda: config(rng, profile_metrics))
    print(f"wrote {args.count} configs to {args.out_dir}")


if __name__ == "__main__":
    main()
