#!/usr/bin/env python3
"""Reference reader of the virt-tpm-state element (docs/FORMAT.md, format 1)
for VM managers: standard library only, plus the `cryptography` package for
sealed (gzip+chacha20poly1305+base64) files and `pyrage` for files sealed
for age recipients (gzip+age+base64).

    python3 virt_tpm_state.py verify [--keys DIR] [--identity FILE] [--max-file-size N] FILE|-
    python3 virt_tpm_state.py extract [--keys DIR] [--identity FILE] FILE|- OUTDIR
    python3 virt_tpm_state.py element FILE|-      # the element, standalone and namespaced

FILE is a domain XML, the bare element in our namespace, or the
namespace-less element that virDomainGetMetadata / `virsh metadata` return.
`verify` exits 0 exactly when the reader accepts, else with the exit code of
`virt-tpm-state verify`: 3 the XML is refused, 4 the element is absent or
invalid (or its TPM version or swtpm encryption does not fit the domain),
5 it belongs to another domain (a clone), 19 a key is missing or does not
open it. One line on stderr says why. The test suite runs it on every vector
(tests/cli/manager.rs), so it cannot drift from the Rust reader.

As a library: `read(xml_bytes, keys={id: key}, identities=[...]) -> State`
raises `Refused` (identities: from `load_identities(path)`, pyrage objects).
"""

import base64
import hashlib
import pathlib
import re
import sys
import zlib
import xml.etree.ElementTree as ET

NS = "urn:virt-tpm-state:1"
# EK certificates swtpm_setup --write-ek-cert-files leaves beside a TPM 2.0
# permall (FORMAT.md §2.4); DER, checked for shape only.
EK_CERTS = {f"ek-{k}.crt" for k in ("rsa2048", "rsa3072", "rsa4096", "secp384r1")}
ALLOWED = {"2.0": {"tpm2-00.permall"} | EK_CERTS, "1.2": {"tpm-00.permall"}}
# The variable store sections (a domain has one of them) and their one file.
VARS = {"nvram": {"VARS.fd"}, "varstore": {"varstore.json"}}
DEFAULT_LIMIT = 1 << 20
MAX_DEPTH = 64
MAX_OUR_ELEMENTS = 64
MAX_ATTRIBUTES = 64
SEALED = "gzip+chacha20poly1305+base64"
AGE = "gzip+age+base64"
FINGERPRINTS = re.compile(r"[0-9a-f]{16}( [0-9a-f]{16})*")
PLAIN = "gzip+base64"
HEX64 = re.compile(r"[0-9a-f]{64}")
UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
B64WS = re.compile(r"[ \t\n\r\f]")


class Refused(Exception):
    """The reader refuses; `exit` is virt-tpm-state's exit code for it."""

    def __init__(self, exit_code, kind, message):
        super().__init__(message)
        self.exit = exit_code
        self.kind = kind


def xml_refused(msg):
    return Refused(3, "domain-xml", msg)


def invalid(msg):
    return Refused(4, "invalid-element", msg)


def key_refused(msg):
    return Refused(19, "key", msg)


class State:
    def __init__(self, uuid, generation, digest, version, files, sealed_with):
        self.uuid, self.generation, self.digest = uuid, generation, digest
        self.version = version  # "2.0", "1.2" or None (NVRAM only)
        self.files = files  # [(section, name, bytes)]
        self.sealed_with = sealed_with


def local(tag):
    """"{uri}name" -> ("uri", "name")."""
    return tuple(tag[1:].split("}", 1)) if tag.startswith("{") else ("", tag)


def load_keys(keys_dir):
    """{key id: key} for every <stamp>-<id>.key: one line of base64, 32 bytes.
    A file that is not a key is skipped (only an element needing it fails)."""
    keys = {}
    for p in sorted(pathlib.Path(keys_dir).glob("*.key")):
        if p.name.startswith("."):
            continue
        try:
            key = base64.b64decode(p.read_text().strip(), validate=True)
        except Exception:
            continue
        if len(key) == 32:
            keys[hashlib.sha256(b"virt-tpm-state key id\0" + key).hexdigest()[:16]] = key
    return keys


def strict_b64(text, what):
    """Standard base64, whitespace ignored, padding required, unused bits zero."""
    s = B64WS.sub("", text or "")
    try:
        raw = base64.b64decode(s, validate=True)
    except Exception:
        raise invalid(f"{what}: not valid base64") from None
    if base64.b64encode(raw).decode() != s:
        raise invalid(f"{what}: not canonical base64")
    return raw


def decimal(value, what):
    if value is None:
        raise invalid(f"missing attribute {what}")
    if not re.fullmatch(r"[0-9]+", value) or int(value) >= 1 << 64:
        raise invalid(f"attribute {what}={value!r} is not a decimal number")
    return int(value)


def gunzip_one(data, limit, name):
    try:
        d = zlib.decompressobj(wbits=31)
        out = d.decompress(data, limit + 1)
    except zlib.error:
        raise invalid(f"{name}: invalid gzip") from None
    if len(out) > limit:
        raise invalid(f"{name}: decompresses past the limit of {limit} bytes")
    if not d.eof or d.unused_data or d.unconsumed_tail:
        raise invalid(f"{name}: truncated gzip, or data after the member")
    return out


def swtpm_header(data, name):
    """(encrypted?) of a swtpm state file; refuses what swtpm never writes."""
    if len(data) < 10:
        raise invalid(f"{name}: shorter than swtpm's header")
    hdrsize = int.from_bytes(data[2:4], "big")
    if data[0] == 0 or hdrsize < 10 or hdrsize > len(data):
        raise invalid(f"{name}: not a swtpm state file")
    if int.from_bytes(data[6:10], "big") != len(data):
        raise invalid(f"{name}: swtpm header length differs from the file's")
    return bool(int.from_bytes(data[4:6], "big") & 1)


def der_certificate(data, name):
    """Refuses an EK certificate file that is not one DER SEQUENCE (long-form
    length) covering the file exactly."""
    n = data[1] & 0x7f if len(data) > 1 else 0
    if len(data) < 2 or data[0] != 0x30 or not 0x81 <= data[1] <= 0x84 \
            or int.from_bytes(data[2:2 + n], "big") != len(data) - 2 - n or len(data) < 2 + n:
        raise invalid(f"{name}: not a DER certificate")


def open_sealed(f, uuid, keys, section, name):
    key_id = f.get("key")
    if key_id is None:
        raise invalid(f"{name}: missing attribute key")
    if not re.fullmatch(r"[0-9a-f]{16}", key_id):
        raise invalid(f"{name}: bad key id")
    for a in ("wrapped-key", "nonce"):
        if f.get(a) is None:
            raise invalid(f"{name}: missing attribute {a}")
    try:
        wrapped = base64.b64decode(f.get("wrapped-key"), validate=True)
        nonce = base64.b64decode(f.get("nonce"), validate=True)
    except Exception:
        raise invalid(f"{name}: wrapped-key or nonce is not base64") from None
    if len(nonce) != 12:
        raise invalid(f"{name}: nonce is not 12 bytes")
    ciphertext = strict_b64(f.text, name)
    if key_id not in keys:
        raise key_refused(f"file {name!r} is encrypted with key {key_id}, which we do not have")
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    def ad(what):
        return f"virt-tpm-state/1 {what}\0{uuid}\0{section}/{name}\0{key_id}".encode()

    if len(wrapped) != 12 + 32 + 16:
        raise key_refused(f"{name}: the wrapped key does not open with key {key_id}")
    try:
        data_key = ChaCha20Poly1305(keys[key_id]).decrypt(wrapped[:12], wrapped[12:], ad("key"))
        return ChaCha20Poly1305(data_key).decrypt(nonce, ciphertext, ad("file"))
    except InvalidTag:
        raise key_refused(f"{name}: does not decrypt with key {key_id}") from None


def load_identities(path):
    """age X25519 identities (AGE-SECRET-KEY-1...) of an identity file."""
    import pyrage

    out = []
    for line in pathlib.Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("AGE-SECRET-KEY-1"):
            raise key_refused(f"{path}: only X25519 identities are read here (no plugins)")
        out.append(pyrage.x25519.Identity.from_str(line))
    return out


def gzip_comment(gz):
    """The FCOMMENT of a gzip member's header (RFC 1952 2.3), or None."""
    if len(gz) < 10 or gz[:2] != b"\x1f\x8b":
        return None
    flg, pos = gz[3], 10
    if flg & 4:  # FEXTRA
        pos += 2 + int.from_bytes(gz[pos:pos + 2], "little")
    if flg & 8:  # FNAME
        pos = gz.index(b"\0", pos) + 1
    if flg & 16:  # FCOMMENT
        return gz[pos:gz.index(b"\0", pos)]
    return None


def open_age(f, uuid, identities, section, name):
    """The gzip stream of a file sealed for recipients, its binding checked."""
    recipients = f.get("recipients")
    if recipients is None or not FINGERPRINTS.fullmatch(recipients):
        raise invalid(f"{name}: missing or bad attribute recipients")
    blob = strict_b64(f.text, name)
    if not identities:
        raise key_refused(f"file {name!r} is sealed for recipients {recipients.replace(' ', ', ')}; no identity given")
    import pyrage

    try:
        gz = pyrage.decrypt(blob, identities)
    except Exception:
        raise key_refused(f"file {name!r} does not open with the identities given (not a recipient, or tampered)") from None
    try:
        comment = gzip_comment(gz)
    except ValueError:
        comment = None
    if comment != f"virt-tpm-state binding uuid={uuid} file={section}/{name}".encode():
        raise key_refused(f"file {name!r} is sealed for another domain or another file name")
    return gz


def depth_and_count(el, depth=1):
    if depth > MAX_DEPTH:
        raise xml_refused(f"the XML nests deeper than {MAX_DEPTH} elements")
    for c in el:
        depth_and_count(c, depth + 1)


def parse(xml_bytes):
    """(domain or None, our element or None); the bare forms have no domain."""
    if re.search(rb"<!DOCTYPE", xml_bytes):
        raise xml_refused("DOCTYPE refused")
    try:
        root = ET.fromstring(xml_bytes)
    except ET.ParseError as e:
        raise xml_refused(f"not well-formed XML: {e}") from None
    depth_and_count(root)
    uri, name = local(root.tag)
    if name == "state" and uri in (NS, ""):
        if uri == "":
            # virDomainGetMetadata's form: the element without a namespace.
            for e in root.iter():
                if local(e.tag)[0] == "":
                    e.tag = "{%s}%s" % (NS, e.tag)
        return None, root
    if (uri, name) != ("", "domain"):
        raise xml_refused("the root element is not <domain>")
    uuid = (root.findtext("uuid") or "").strip()
    if not UUID.fullmatch(uuid):
        raise xml_refused("no valid <uuid>")
    if not (root.findtext("name") or "").strip():
        raise xml_refused("no <name>")
    ours = []
    for meta in root.findall("metadata"):
        ours += [e for e in meta if local(e.tag)[0] == NS]
    if len(ours) > 1:
        raise xml_refused("<metadata> holds more than one element of our namespace")
    return root, (ours[0] if ours else None)


def decode(st, keys, limit, identities=()):
    if sum(1 for _ in st.iter()) > MAX_OUR_ELEMENTS:
        raise xml_refused("our element holds too many elements")
    for e in st.iter():
        if len(e.attrib) > MAX_ATTRIBUTES:
            raise xml_refused("too many attributes")
    if local(st.tag)[1] != "state":
        raise invalid("the element is not <state>")
    for a in ("format", "uuid", "generation", "digest"):
        if st.get(a) is None:
            raise invalid(f"missing attribute {a}")
    if st.get("format") != "1":
        raise invalid(f"unknown format {st.get('format')!r}")
    uuid = st.get("uuid")
    if not UUID.fullmatch(uuid):
        raise invalid(f"uuid {uuid!r} is not canonical")
    uuid = uuid.lower()
    generation = decimal(st.get("generation"), "generation")
    digest = st.get("digest")
    if not HEX64.fullmatch(digest):
        raise invalid("digest is not 64 lowercase hex digits")
    parent = st.get("parent", "")
    if parent and not HEX64.fullmatch(parent):
        raise invalid("parent is not 64 lowercase hex digits")
    sections = [local(c.tag)[1] for c in st]
    for s in sections:
        if s != "tpm" and s not in VARS:
            raise invalid(f"unknown section <{s}>")
    if not sections:
        raise invalid("no section")
    if len(set(sections)) != len(sections) or set(VARS) <= set(sections):
        raise invalid("a section appears twice (or <nvram> beside <varstore>)")
    version, files, lines, sealed_with = None, [], [], []
    for sec in st:
        section = local(sec.tag)[1]
        if section == "tpm":
            version = sec.get("version")
            if version not in ALLOWED:
                raise invalid(f"TPM version {version!r}")
            allowed = ALLOWED[version]
        else:
            allowed = VARS[section]
        if len(sec) == 0:
            raise invalid(f"<{section}> holds no file")
        names = set()
        for f in sec:
            if local(f.tag)[1] != "file":
                raise invalid(f"<{section}> holds <{local(f.tag)[1]}>")
            if len(f):
                raise invalid("a <file> contains an element")
            name = f.get("name")
            if name is None:
                raise invalid("missing attribute name")
            if name not in allowed:
                raise invalid(f"file name {name!r} not allowed in <{section}>")
            if name in names:
                raise invalid(f"file {name!r} appears twice")
            names.add(name)
            for a in ("size", "sha256", "encoding"):
                if f.get(a) is None:
                    raise invalid(f"{name}: missing attribute {a}")
            size = decimal(f.get("size"), "size")
            sha = f.get("sha256")
            if not HEX64.fullmatch(sha):
                raise invalid(f"{name}: sha256 is not 64 lowercase hex digits")
            enc = f.get("encoding")
            if enc not in (PLAIN, SEALED, AGE):
                raise invalid(f"{name}: unknown encoding {enc!r}")
            if size > limit:
                raise invalid(f"{name}: declared size {size} above the limit")
            if enc == SEALED:
                gz = open_sealed(f, uuid, keys, section, name)
                if f.get("key") not in sealed_with:
                    sealed_with.append(f.get("key"))
            elif enc == AGE:
                gz = open_age(f, uuid, identities, section, name)
            else:
                gz = strict_b64(f.text, name)
            data = gunzip_one(gz, limit, name)
            if len(data) != size:
                raise invalid(f"{name}: size differs")
            got = hashlib.sha256(data).hexdigest()
            if got != sha:
                raise invalid(f"{name}: sha256 differs")
            if section == "tpm" and name in EK_CERTS:
                der_certificate(data, name)
            elif section == "tpm":
                swtpm_header(data, name)
            files.append((section, name, data))
            lines.append(f"{section}/{name} {got}\n")
    if hashlib.sha256("".join(sorted(lines)).encode()).hexdigest() != digest:
        raise invalid("digest differs")
    return State(uuid, generation, digest, version, files, sealed_with)


def domain_tpm(dom):
    """(version, swtpm encrypts?) of the domain's emulated TPM, or None."""
    for tpm in dom.findall("devices/tpm"):
        backend = tpm.find("backend")
        if backend is None or backend.get("type") != "emulator":
            continue
        version = backend.get("version")
        if version is None:
            # libvirt's default: 1.2 only for tpm-tis on x86, else 2.0; the
            # model defaults to tpm-spapr on ppc64, tpm-tis elsewhere.
            arch = dom.find("os/type")
            arch = arch.get("arch") if arch is not None else None
            x86 = arch in (None, "x86_64", "i686")
            model = tpm.get("model") or ("tpm-spapr" if (arch or "").startswith("ppc64") else "tpm-tis")
            version = "1.2" if model == "tpm-tis" and x86 else "2.0"
        enc = backend.find("encryption")
        return version, enc is not None and enc.get("secret") is not None
    return None


def read(xml_bytes, keys=None, limit=DEFAULT_LIMIT, identities=()):
    """The accepted State, or raises Refused (exit 4 when there is no element)."""
    dom, st = parse(xml_bytes)
    if st is None:
        raise Refused(4, "no-element", "no virt-tpm-state element")
    state = decode(st, keys or {}, limit, identities)
    if dom is not None:
        # Reader rules that compare the element with its domain.
        tpm = domain_tpm(dom)
        if tpm is not None and state.version is not None:
            version, encrypts = tpm
            if version not in ALLOWED:
                raise Refused(4, "tpm-version", f"unknown TPM version {version!r}")
            if version != state.version:
                raise Refused(4, "tpm-version",
                              f"the element holds a TPM {state.version} state, the domain's TPM is {version}")
            encrypted = any(swtpm_header(d, n) for s, n, d in state.files
                            if s == "tpm" and n not in EK_CERTS)
            if encrypted != encrypts:
                raise Refused(4, "swtpm-encryption",
                              "swtpm encryption of the state does not match the domain's <encryption>")
        if state.uuid != dom.findtext("uuid").strip().lower():
            raise Refused(5, "clone", f"the element belongs to domain {state.uuid} (a clone)")
    return state


def standalone(xml_bytes):
    """Our element alone, namespaced (for xmllint --relaxng)."""
    _, st = parse(xml_bytes)
    if st is None:
        raise Refused(4, "no-element", "no virt-tpm-state element")
    ET.register_namespace("vts", NS)
    return ET.tostring(st, encoding="unicode")


def main(argv):
    import argparse

    ap = argparse.ArgumentParser(prog="virt_tpm_state.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("verify", "extract", "element"):
        p = sub.add_parser(name)
        p.add_argument("--keys", metavar="DIR")
        p.add_argument("--identity", metavar="FILE", action="append", default=[])
        p.add_argument("--max-file-size", type=int, default=DEFAULT_LIMIT)
        p.add_argument("file")
        if name == "extract":
            p.add_argument("outdir")
    a = ap.parse_args(argv)
    data = sys.stdin.buffer.read() if a.file == "-" else open(a.file, "rb").read()
    try:
        if a.cmd == "element":
            print(standalone(data))
            return 0
        keys = load_keys(a.keys) if a.keys else {}
        identities = [i for path in a.identity for i in load_identities(path)]
        state = read(data, keys, a.max_file_size, identities)
    except Refused as e:
        print(f"virt_tpm_state: {e}", file=sys.stderr)
        return e.exit
    if a.cmd == "extract":
        out = pathlib.Path(a.outdir)
        out.mkdir(mode=0o700, exist_ok=True)
        for _, name, d in state.files:
            with open(out / name, "xb") as fh:  # never over an existing file
                fh.write(d)
    print(f"{state.version or 'none'} {state.digest} generation={state.generation} uuid={state.uuid}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
