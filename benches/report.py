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
    """(product, baseline) hyperfine results of one json file."""
    r = J(name)["results"]
    return r[0], r[1]


def cell(r):
    return (f"{ms(r['median'])}", f"{ms(r['min'])}–{ms(r['max'])}", f"{ms(r['stddev'])}")


rows = []


def row(num, what, prod, base, basename, target, met, note=""):
    pm, pr, ps = cell(prod)
    bm, br, bs = cell(base)
    ratio = prod["median"] / base["median"]
    rows.append(
        f"| {num} | {what} | {pm} | {pr} | {ps} | {basename}: {bm} ({br}, σ {bs}) | "
        f"**{ratio:.2f}x** | {target} | {met(ratio)}{note} |"
    )
    return ratio


yes_no = lambda ok: "met" if ok else "**not met**"

# machine
print("### Machine\n")
cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-").strip()
fs = sh(f"df -T {scratch} | tail -1 | awk '{{print $1\" (\"$2\")\"}}'")
print(f"- {os.cpu_count()} CPUs, {cpu}; {sh('free -g | awk \"/Mem:/{print \\$2}\"')} GiB RAM; "
      f"kernel {platform.release()}; {sh('. /etc/os-release; echo $PRETTY_NAME')}")
print(f"- scratch tree (where the hook restores and fsyncs): `{scratch}` on {fs}")
print(f"- {sh('hyperfine --version')}, {sh('virsh --version | sed s/^/libvirt\\ /')}, "
      f"{sh('rustc --version')}, `cargo build --release --locked`")
print(f"- runs: {J('row1-start')['results'][0]['times'].__len__()} per command (rows 1, 2), "
      f"{len(J('row3-store')['results'][0]['times'])} (row 3)\n")

print("### Results\n")
print("| row | what | median | min–max | σ | baseline, same run | ratio of medians | target | |")
print("|---|---|---|---|---|---|---|---|---|")
for op in ["start", "started", "release"]:
    p, b = timing(f"row1-{op}")
    row("1", f"hook `{op}` (nothing to do), whole process", p, b, "`/bin/true`", "≤ 1.5x",
        lambda r: yes_no(r <= 1.5))
p, b = timing("row1-release-withstate")
row("1", "hook `release` with a 9 KiB state in the XML (extra)", p, b, "`/bin/true`", "(≤ 1.5x)",
    lambda r: yes_no(r <= 1.5))
p, b = timing("row2-typical")
row("2", "hook `prepare` restoring the typical state (real 9268 B permall), fsync included", p, b,
    "shell hook `cat >/dev/null`", "≤ 3x", lambda r: yes_no(r <= 3))
p, b = timing("row2-large")
row("2", "hook `prepare` restoring a 256 KiB permall, fsync included", p, b,
    "shell hook `cat >/dev/null`", "(none)", lambda r: "—")
rows.append("| 2 | hook `prepare`, 256 KiB permall + 540 KiB VARS | — | — | — | — | — | (none) | "
            "pending: the hook does not carry NVRAM yet (UEFI vars issue) |")
p, b = timing("row3-store")
row("3", "`virt-tpm-state store` of a stopped domain (writes the config)", p, b,
    "`virsh metadata --set --config`", "≤ 1.5x", lambda r: yes_no(r <= 1.5))
p, b = timing("row3-unchanged")
nw = J("row3-nowrite")
nowrite = nw["before"] == nw["after"]
row("3", "`store` with nothing changed", p, b, "`virsh metadata --set --config`",
    "< 1x, no write", lambda r: yes_no(r < 1 and nowrite),
    f"; config file inode/mtime/size {'unchanged' if nowrite else 'CHANGED'} over 10 stores "
    f"(`{nw['after']}`)")
for name, label in [("typical", "typical (real 9268 B permall)"), ("large", "256 KiB synthetic (random)")]:
    s = J(f"row4-{name}")
    r_ovirt = s["ours"] / s["ovirt"]
    r_floor = s["ours"] / s["floor"]
    target = "≤ oVirt, ≤ 1.05x floor" if name == "typical" else "(none)"
    met = yes_no(r_ovirt <= 1 and r_floor <= 1.05) if name == "typical" else "—"
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
