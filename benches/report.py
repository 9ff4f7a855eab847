#!/usr/bin/env python3
"""Prints the machine and the benchmark table (Markdown) from benches/run.sh's output dir."""
import json, os, platform, statistics, subprocess, sys

out, scratch = sys.argv[1], sys.argv[2]
J = lambda name: json.load(open(os.path.join(out, "json", name + ".json")))


def sh(cmd):
    return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()


def ms(x):
    return f"{x * 1000:.2f} ms"


def timing(name):
    """(product, baseline, wrapper floor or None) hyperfine results of one json file."""
    r = J(name)["results"]
    floor = r[-1] if r[-1]["command"].startswith("sh -c :") else None
    return r[0], r[1], floor


def cell(r):
    return (f"{ms(r['median'])}", f"{ms(r['min'])}–{ms(r['max'])}", f"{ms(r['stddev'])}")


rows = []


def row(num, what, prod, base, floor, basename, target, met, note=""):
    pm, pr, ps = cell(prod)
    bm, br, bs = cell(base)
    raw = prod["median"] / base["median"]
    if floor is not None:
        f = floor["median"]
        ratio = (prod["median"] - f) / (base["median"] - f)
        shown = f"**{ratio:.2f}x** (raw {raw:.2f}x; wrapper `sh -c :` {ms(f)} subtracted)"
    else:
        ratio = raw
        shown = f"**{ratio:.2f}x**"
    rows.append(
        f"| {num} | {what} | {pm} | {pr} | {ps} | {basename}: {bm} ({br}, σ {bs}) | "
        f"{shown} | {target} | {met(ratio)}{note} |"
    )
    return ratio


yes_no = lambda ok: "met" if ok else "**not met**"

# machine
print("### Machine\n")
cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-").strip()
fs = sh(f"df -T {scratch} | tail -1 | awk '{{print $1\" (\"$2\")\"}}'")
ram = sh("free -g | awk '/Mem:/{print $2}'")
osname = sh(". /etc/os-release; echo $PRETTY_NAME")
libvirt = sh("virsh --version")
print(f"- {os.cpu_count()} CPUs, {cpu}; {ram} GiB RAM; kernel {platform.release()}; {osname}")
print(f"- scratch tree (where the hook restores and fsyncs): `{scratch}` on {fs}")
print(f"- {sh('hyperfine --version')}, libvirt {libvirt}, {sh('rustc --version')}, "
      "binaries from `cargo build --release --locked`")
print(f"- runs: {J('row1-start')['results'][0]['times'].__len__()} per command (rows 1, 2), "
      f"{len(J('row3-store')['results'][0]['times'])} (row 3)\n")

print("### Results\n")
print("| row | what | median | min–max | σ | baseline, same run | ratio of medians | target | |")
print("|---|---|---|---|---|---|---|---|---|")
for op in ["start", "started", "release"]:
    p, b, f = timing(f"row1-{op}")
    row("1", f"hook `{op}` (nothing to do), whole process", p, b, f, "`/bin/true`", "≤ 1.5x",
        lambda r: yes_no(r <= 1.5))
p, b, f = timing("row1-release-withstate")
row("1", "hook `release` with a 9 KiB state in the XML (extra)", p, b, f, "`/bin/true`", "(≤ 1.5x)",
    lambda r: yes_no(r <= 1.5))
p, b, f = timing("row2-typical")
row("2", "hook `prepare` restoring the typical state (real 9268 B permall), fsync included", p, b, f,
    "shell hook `cat >/dev/null`", "≤ 3x", lambda r: yes_no(r <= 3))
if os.path.exists(os.path.join(out, "json", "row2-typical-stored.json")):
    p, b, f = timing("row2-typical-stored")
    row("2", "hook `prepare`, the same state as `store` wrote it (sealed with the host key when the CLI has keys)",
        p, b, f, "shell hook `cat >/dev/null`", "≤ 3x", lambda r: yes_no(r <= 3))
p, b, f = timing("row2-large")
row("2", "hook `prepare` restoring a 256 KiB permall, fsync included", p, b, f,
    "shell hook `cat >/dev/null`", "(none)", lambda r: "—")
p, b, f = timing("row2-large-vars")
row("2", "hook `prepare` restoring a 256 KiB permall plus a 540 KiB OVMF VARS file, fsync included", p, b, f,
    "shell hook `cat >/dev/null`", "(none)", lambda r: "—")
p, b, f = timing("row3-store")
row("3", "`virt-tpm-state store` of a stopped domain (writes the config)", p, b, f,
    "`virsh metadata --set --config`", "≤ 1.5x", lambda r: yes_no(r <= 1.5))
p, b, f = timing("row3-unchanged")
nw = J("row3-nowrite")
nowrite = nw["before"] == nw["after"]
row("3", "`store` with nothing changed", p, b, f, "`virsh metadata --set --config`",
    "< 1x, no write", lambda r: yes_no(r < 1 and nowrite),
    f"; config file inode/mtime/size {'unchanged' if nowrite else 'CHANGED'} over 10 stores "
    f"(`{nw['after']}`)")
for name, label in [("typical", "typical (real 9268 B permall), format 1 gzip+base64"),
                    ("typical-stored", "typical, as `store` wrote it (default protection)"),
                    ("large", "256 KiB synthetic (random)")]:
    if not os.path.exists(os.path.join(out, "json", f"row4-{name}.json")):
        continue
    s = J(f"row4-{name}")
    r_ovirt = s["ours"] / s["ovirt"]
    r_floor = s["ours"] / s["floor"]
    target = "(none)" if name == "large" else "≤ oVirt, ≤ 1.05x floor"
    met = "—" if name == "large" else yes_no(r_ovirt <= 1 and r_floor <= 1.05)
    rows.append(
        f"| 4 | encoded size, {label}: our base64 text | {s['ours']} B | (deterministic) | — | "
        f"oVirt `tar --xz --sort=name` + base64: {s['ovirt']} B; xz -9 + base64: {s['floor']} B | "
        f"**{r_ovirt:.3f}x** oVirt, **{r_floor:.3f}x** floor | {target} | {met}; "
        f"raw {s['raw']} B, whole element {s['element']} B |"
    )
rss = {n: J(f"row5-{n}") for n in ["large", "large-padded", "typical", "true", "shell"]}
med = {n: statistics.median(v["kib"]) for n, v in rss.items()}
rng = {n: f"{min(v['kib'])}–{max(v['kib'])}" for n, v in rss.items()}
grow = med["large-padded"] - med["large"]
xml_grow = (rss["large-padded"]["xml_bytes"] - rss["large"]["xml_bytes"]) / 1024
rows.append(
    f"| 5 | peak RSS, hook `prepare`, 256 KiB permall (XML {rss['large']['xml_bytes']} B) | "
    f"{med['large']:.0f} KiB | {rng['large']} KiB | — | `/bin/true`: {med['true']:.0f} KiB; shell hook: "
    f"{med['shell']:.0f} KiB; hook, typical state: {med['typical']:.0f} KiB ({rng['typical']}) | — | — | |"
)
rows.append(
    f"| 5 | peak RSS, same state, XML padded with 3 MiB of other metadata "
    f"({rss['large-padded']['xml_bytes']} B) | {med['large-padded']:.0f} KiB | {rng['large-padded']} KiB | — | "
    f"unpadded: {med['large']:.0f} KiB | +{grow:.0f} KiB for +{xml_grow:.0f} KiB of XML "
    f"(**{grow / xml_grow:.2f}x** the added input) | growth ≤ the input buffer (1x) | "
    f"{yes_no(grow <= xml_grow * 1.1)} |"
)
print("\n".join(rows))

d = J("row1-diag")["results"]
f = d[-1]["median"]
print("\n### Diagnosis for row 1 (same run; each as `sh -c 'exec PROG < stdin'`)\n")
print("| process | median | min–max | vs `/bin/true`, wrapper subtracted |")
print("|---|---|---|---|")
true_med = next(r["median"] for r in d if r["command"] == "/bin/true")
for r in d:
    rel = "—" if r is d[-1] else f"{(r['median'] - f) / (true_med - f):.2f}x"
    print(f"| {r['command']} | {ms(r['median'])} | {ms(r['min'])}–{ms(r['max'])} | {rel} |")
