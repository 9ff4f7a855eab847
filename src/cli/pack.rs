//! `pack`: builds an element offline, without libvirt, from state a manager
//! holds: a swtpm state dir, a permall file, swtpm's linear state file, an
//! oVirt blob (base64 of a `tar.xz` of the swtpm dir), or this host's copy
//! kept at the last stop (`--kept UUID`, the final state of a transient
//! domain). The encoder is `store`'s own ([`crate::format::encode`]).

use super::{read_input, CliError, Ctx, PackArgs};
use crate::format::{encode, Protection, Provenance, Style};
use crate::fs::{keys_dir, load_keyring, open_user_dir, read_tpm_files, HostData};
use crate::state::{DomainUuid, MachineState, Sha256Sum, StateFile, TpmState, TpmVersion};
use crate::swtpm::check_tpm_file;
use std::io::Read;
use std::path::Path;

/// Largest oVirt blob read (base64 text): a TPM dir is a few KiB.
const MAX_OVIRT_BLOB: u64 = 16 * 1024 * 1024;

#[derive(serde::Serialize)]
struct PackJson {
    uuid: String,
    generation: u64,
    digest: String,
    parent: Option<String>,
    stored: String,
    host: String,
    tpm_version: Option<String>,
    files: Vec<PackFile>,
    protection: String,
    element: String,
    /// With `--into`: the whole domain XML with the element in `<metadata>`.
    domain_xml: Option<String>,
}

#[derive(serde::Serialize)]
struct PackFile {
    section: &'static str,
    name: String,
    size: usize,
    sha256: String,
}

fn usage(s: impl Into<String>) -> CliError {
    CliError::Usage(s.into())
}

fn bad_input(path: &Path, why: impl std::fmt::Display) -> CliError {
    CliError::ReadInput {
        path: path.to_path_buf(),
        source: std::io::Error::other(why.to_string()),
    }
}

/// Reads a file the user names, through the filesystem layer (its dir by
/// the trust rule; only a regular, singly-linked file, at most `max` bytes).
fn read_user_file(path: &Path, max: u64) -> Result<Vec<u8>, CliError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let leaf = path
        .file_name()
        .ok_or_else(|| bad_input(path, "not a file name"))?
        .to_string_lossy()
        .into_owned();
    let dir = open_user_dir(parent, false)?
        .ok_or_else(|| bad_input(path, "its directory does not exist"))?;
    dir.read_file(&leaf, max)?
        .ok_or_else(|| bad_input(path, "no such file"))
}

fn version_arg(v: &Option<String>) -> Result<Option<TpmVersion>, CliError> {
    v.as_deref()
        .map(|s| {
            TpmVersion::parse(s)
                .ok_or_else(|| usage(format!("--tpm-version {s:?}: expected 2.0 or 1.2")))
        })
        .transpose()
}

fn tpm_state(version: TpmVersion, data: Vec<u8>) -> TpmState {
    TpmState::new(
        version,
        vec![StateFile {
            name: version.permall_name().to_string(),
            data,
        }],
    )
}

/// The TPM state from a swtpm state dir: `tpm2-00.permall` or
/// `tpm-00.permall` in DIR (or in its `tpm2`/`tpm1.2` subdir, as in
/// `/var/lib/libvirt/swtpm/<uuid>`), with the EK certificates beside a
/// TPM 2.0 permall, read as `store` reads a live dir.
fn from_state_dir(path: &Path, want: Option<TpmVersion>, max: u64) -> Result<TpmState, CliError> {
    let dir = open_user_dir(path, false)?.ok_or_else(|| bad_input(path, "no such directory"))?;
    let versions: Vec<TpmVersion> = match want {
        Some(v) => vec![v],
        None => vec![TpmVersion::V2_0, TpmVersion::V1_2],
    };
    let mut found = Vec::new();
    for v in &versions {
        if let Some(t) = read_tpm_files(&dir, *v, max)? {
            found.push(t);
        } else if let Some(sub) = dir.open_subdir(v.state_subdir())? {
            if let Some(t) = read_tpm_files(&sub, *v, max)? {
                found.push(t);
            }
        }
    }
    match found.len() {
        1 => Ok(found.pop().expect("one")),
        0 => Err(bad_input(
            path,
            "holds no tpm2-00.permall or tpm-00.permall (nor a tpm2/ or tpm1.2/ dir with one)",
        )),
        _ => Err(usage(format!(
            "{} holds both a TPM 2.0 and a TPM 1.2 state: say which with --tpm-version",
            path.display()
        ))),
    }
}

/// oVirt's form: base64 of a `tar.xz` of the swtpm state dir (whitespace
/// in the text ignored). Only the permall entry is taken; any path prefix
/// (`./`, `tpm2/`) is allowed, links and other entries are ignored.
fn from_ovirt(path: &Path, want: Option<TpmVersion>, max: u64) -> Result<TpmState, CliError> {
    use base64::Engine as _;
    let text = if path == Path::new("-") {
        read_input(path)?
    } else {
        read_user_file(path, MAX_OVIRT_BLOB)?
    };
    let text: Vec<u8> = text
        .into_iter()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&text)
        .map_err(|e| bad_input(path, format!("not base64 ({e})")))?;
    let xz = xz2::read::XzDecoder::new(raw.as_slice()).take(64 * max + 65536);
    let mut archive = tar::Archive::new(xz);
    let mut found: Vec<TpmState> = Vec::new();
    let entries = archive
        .entries()
        .map_err(|e| bad_input(path, format!("not a tar.xz ({e})")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad_input(path, format!("not a tar.xz ({e})")))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        let Some(version) = [TpmVersion::V2_0, TpmVersion::V1_2]
            .into_iter()
            .find(|v| name.as_deref() == Some(v.permall_name()))
        else {
            continue;
        };
        if want.is_some_and(|w| w != version) {
            continue;
        }
        let mut data = Vec::new();
        (&mut entry)
            .take(max + 1)
            .read_to_end(&mut data)
            .map_err(|e| bad_input(path, format!("not a tar.xz ({e})")))?;
        if data.len() as u64 > max {
            return Err(bad_input(
                path,
                format!("its permall is larger than max_file_size ({max} bytes)"),
            ));
        }
        found.push(tpm_state(version, data));
    }
    match found.len() {
        1 => Ok(found.pop().expect("one")),
        0 => Err(bad_input(
            path,
            "the archive holds no tpm2-00.permall or tpm-00.permall",
        )),
        _ => Err(bad_input(
            path,
            "the archive holds more than one permall (say which with --tpm-version)",
        )),
    }
}

pub(crate) fn pack(ctx: &Ctx, args: &PackArgs) -> Result<(), CliError> {
    let max = ctx.config.max_file_size;
    let want = version_arg(&args.tpm_version)?;
    let uuid = match (&args.uuid, &args.kept) {
        (Some(u), kept) => {
            let u = DomainUuid::parse_canonical(u).ok_or_else(|| {
                usage(format!(
                    "--uuid {u:?}: not a canonical uuid (8-4-4-4-12 hex)"
                ))
            })?;
            if let Some(k) = kept {
                if DomainUuid::parse_canonical(k).as_ref() != Some(&u) {
                    return Err(usage("--uuid and --kept name different domains"));
                }
            }
            u
        }
        (None, Some(k)) => DomainUuid::parse_canonical(k).ok_or_else(|| {
            usage(format!(
                "--kept {k:?}: not a canonical uuid (8-4-4-4-12 hex)"
            ))
        })?,
        (None, None) => return Err(usage("--uuid UUID is required (or --kept UUID)")),
    };

    let state = if args.kept.is_some() {
        let host = HostData::new(&ctx.paths);
        let mut found = None;
        for tpm in [Some(TpmVersion::V2_0), Some(TpmVersion::V1_2), None] {
            if want.is_some() && tpm != want {
                continue;
            }
            if let Some(s) = host.read_kept_state(&uuid, tpm, true, max)? {
                found = Some(s);
                break;
            }
        }
        let kept = found.ok_or_else(|| CliError::NoTpm {
            name: uuid.to_string(),
            why: "this host keeps no copy of its state (kept at each stop by the hook)".into(),
        })?;
        // `--vars FILE` replaces the kept VARS (or adds them): it was
        // silently dropped with `--kept` before.
        match &args.vars {
            Some(f) => MachineState::new(kept.tpm, Some(read_user_file(f, max)?)),
            None => kept,
        }
    } else {
        let tpm = match (&args.state_dir, &args.permall, &args.linear, &args.ovirt) {
            (Some(d), None, None, None) => Some(from_state_dir(d, want, max)?),
            (None, Some(f), None, None) => {
                let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
                let version = match want {
                    Some(v) => v,
                    None => [TpmVersion::V2_0, TpmVersion::V1_2]
                        .into_iter()
                        .find(|v| name.as_deref() == Some(v.permall_name()))
                        .ok_or_else(|| {
                            usage(format!(
                                "{}: cannot tell the TPM version from the name; pass --tpm-version 2.0 or 1.2",
                                f.display()
                            ))
                        })?,
                };
                Some(tpm_state(version, read_user_file(f, max)?))
            }
            (None, None, Some(f), None) => {
                // A linear file is at most a few slots of permall-sized blobs.
                let data = read_user_file(f, 4 * max + 65536)?;
                let permall = crate::linear::permall(&data)
                    .map_err(|e| bad_input(f, format!("not a swtpm linear state file ({e})")))?
                    .ok_or_else(|| bad_input(f, "the linear state file holds no permanent state"))?;
                if permall.len() as u64 > max {
                    return Err(bad_input(f, format!("its permall is larger than max_file_size ({max} bytes)")));
                }
                Some(tpm_state(want.unwrap_or(TpmVersion::V2_0), permall.to_vec()))
            }
            (None, None, None, Some(f)) => Some(from_ovirt(f, want, max)?),
            (None, None, None, None) if args.vars.is_some() => None,
            _ => {
                return Err(usage(
                    "name exactly one of --state-dir DIR, --permall FILE, --linear FILE, --ovirt FILE, --kept UUID (or only --vars FILE)",
                ))
            }
        };
        let vars = match &args.vars {
            Some(f) => Some(read_user_file(f, max)?),
            None => None,
        };
        MachineState::new(tpm, vars)
    };
    if let Some(t) = &state.tpm {
        for f in t.files() {
            if let Err(e) = check_tpm_file(t.version, f) {
                return Err(bad_input(
                    Path::new(&f.name),
                    format!("not a swtpm state file ({e}); nothing was written"),
                ));
            }
        }
    }
    if state.nvram.as_ref().is_some_and(|v| v.data.is_empty()) {
        return Err(bad_input(Path::new("VARS.fd"), "the VARS file is empty"));
    }

    // With --into over an element, the chain continues as `store` continues
    // it: the next generation, over that element's digest (the same state
    // keeps its generation and parent).
    let into = match &args.into {
        Some(path) => Some((path, read_input(path)?)),
        None => None,
    };
    let previous = match &into {
        Some((_, bytes)) => crate::domain::parse_domain(bytes, &ctx.config.namespace)?
            .metadata
            .as_ref()
            .and_then(|el| crate::format::read_header(el).ok()),
        None => None,
    };
    let (default_generation, default_parent) = match &previous {
        Some((p, d)) if *d == state.digest() => (p.generation, p.parent),
        Some((p, d)) => (p.generation.saturating_add(1), Some(*d)),
        None => (1, None),
    };
    let parent =
        match &args.parent {
            Some(p) => Some(Sha256Sum::parse_hex(p).ok_or_else(|| {
                usage(format!("--parent {p:?}: expected 64 lowercase hex digits"))
            })?),
            None => default_parent,
        };
    let provenance = Provenance {
        uuid: uuid.clone(),
        generation: args.generation.unwrap_or(default_generation),
        parent,
        stored: match &args.stored {
            Some(s) => {
                humantime::parse_rfc3339(s).map_err(|_| {
                    usage(format!(
                        "--stored {s:?}: expected RFC 3339 UTC, e.g. 2026-01-01T00:00:00Z"
                    ))
                })?;
                s.clone()
            }
            None => super::now_stamp(),
        },
        host: match &args.host {
            Some(h) => h.clone(),
            None => super::this_host(),
        },
    };

    let swtpm_encrypted = state
        .tpm
        .as_ref()
        .is_some_and(crate::swtpm::state_is_encrypted);
    let keys = if args.plaintext {
        Default::default()
    } else {
        load_keyring(&ctx.paths)?
    };
    let mut fill = crate::envelope::os_random;
    let (protection, shown) = if args.plaintext {
        (
            Protection::Plain,
            if swtpm_encrypted { "swtpm" } else { "none" }.to_string(),
        )
    } else {
        let chosen = match &args.key {
            Some(id) => {
                let kid = crate::envelope::KeyId::parse(id)
                    .ok_or_else(|| usage(format!("--key {id:?}: expected a key id (16 lowercase hex digits)")))?;
                if let Some(bad) = keys.rejected_for(&kid) {
                    return Err(CliError::Key(format!(
                        "key {id}: its file {} is unusable: {}",
                        bad.file, bad.why
                    )));
                }
                let key = keys.get(&kid).ok_or_else(|| {
                    CliError::Key(format!(
                        "no key {id} in {}; nothing was written",
                        keys_dir(&ctx.paths).display()
                    ))
                })?;
                let id = keys
                    .ids()
                    .into_iter()
                    .find(|i| **i == kid)
                    .expect("a key the keyring has");
                (id, key)
            }
            // `--kept` without --key: sealed as `store` would (newest key).
            None => keys.newest().ok_or_else(|| {
                CliError::Key(format!(
                    "no key in {} to encrypt the TPM state with; nothing was written. Pass --key ID, or --plaintext",
                    keys_dir(&ctx.paths).display()
                ))
            })?,
        };
        (
            Protection::Sealed {
                key_id: chosen.0,
                key: chosen.1,
                fill: &mut fill,
            },
            format!("virt-tpm-state:{}", chosen.0.as_str()),
        )
    };
    let style = if args.bare {
        Style::ForSetMetadata
    } else {
        Style::Standalone
    };
    let element = encode(&state, &provenance, style, protection)
        .expect("plaintext and a host key cannot fail to encode");

    let domain_xml = match &into {
        Some((path, bytes)) => Some(insert_into(ctx, path, bytes, &uuid, &element)?),
        None => None,
    };
    if args.json {
        let j = PackJson {
            uuid: uuid.to_string(),
            generation: provenance.generation,
            digest: state.digest().hex(),
            parent: provenance.parent.map(|p| p.hex()),
            stored: provenance.stored.clone(),
            host: provenance.host.clone(),
            tpm_version: state.tpm.as_ref().map(|t| t.version.to_string()),
            files: state
                .sections()
                .into_iter()
                .map(|(section, f)| PackFile {
                    section,
                    name: f.name.clone(),
                    size: f.data.len(),
                    sha256: f.sha256().hex(),
                })
                .collect(),
            protection: shown,
            element,
            domain_xml,
        };
        super::out(&format!(
            "{}\n",
            serde_json::to_string_pretty(&j).expect("serializable")
        ));
    } else {
        super::out(&format!("{}\n", domain_xml.as_deref().unwrap_or(&element)));
    }
    Ok(())
}

/// The domain XML at `path` with `element` in its `<metadata>`: an element
/// of our namespace there is replaced, a missing `<metadata>` added before
/// `</domain>`. The domain must be readable by the reader and have the
/// element's uuid (else exit 5, as the hook would refuse it).
fn insert_into(
    ctx: &Ctx,
    path: &Path,
    bytes: &[u8],
    uuid: &DomainUuid,
    element: &str,
) -> Result<String, CliError> {
    use quick_xml::events::Event;
    use quick_xml::name::ResolveResult;
    let info = crate::domain::parse_domain(bytes, &ctx.config.namespace)?;
    if &info.uuid != uuid {
        let clone = crate::restore::ErrorKind::Clone {
            uuid: info.uuid.clone(),
            element_uuid: uuid.clone(),
            ns: ctx.config.namespace.clone(),
        };
        return Err(clone.named(info.name.clone()).into());
    }
    let text = std::str::from_utf8(bytes).map_err(|_| bad_input(path, "not UTF-8"))?;
    // Byte spans from quick-xml's own positions: where `<metadata>` opens
    // and closes (or is empty), our element in it, and `</domain>`.
    let mut reader = quick_xml::reader::NsReader::from_str(text);
    let mut depth = 0usize;
    let mut in_metadata = false;
    let mut metadata_empty: Option<(usize, usize)> = None;
    let mut metadata_close: Option<usize> = None;
    let mut ours: Option<(usize, usize)> = None;
    let mut ours_start: Option<(usize, usize)> = None;
    let mut domain_close: Option<usize> = None;
    loop {
        let before = reader.buffer_position() as usize;
        let (ns, ev) = reader
            .read_resolved_event()
            .map_err(|e| bad_input(path, format!("not well-formed XML ({e})")))?;
        let is_ours =
            matches!(ns, ResolveResult::Bound(n) if n.as_ref() == ctx.config.namespace.as_bytes());
        let after = reader.buffer_position() as usize;
        let start = before + text[before..].find('<').unwrap_or(0);
        match ev {
            Event::Start(e) => {
                depth += 1;
                if depth == 2 && e.local_name().as_ref() == b"metadata" {
                    in_metadata = true;
                } else if in_metadata && depth == 3 && is_ours {
                    ours_start = Some((start, depth));
                }
            }
            Event::Empty(e) => {
                if depth == 1 && e.local_name().as_ref() == b"metadata" {
                    metadata_empty = Some((start, after));
                } else if in_metadata && depth == 2 && is_ours {
                    ours = Some((start, after));
                }
            }
            Event::End(e) => {
                if let Some((s, d)) = ours_start {
                    if d == depth {
                        ours = Some((s, after));
                        ours_start = None;
                    }
                }
                if depth == 2 && in_metadata && e.local_name().as_ref() == b"metadata" {
                    metadata_close = Some(start);
                    in_metadata = false;
                }
                if depth == 1 {
                    domain_close = Some(start);
                }
                depth = depth.saturating_sub(1);
            }
            Event::Eof => break,
            _ => {}
        }
    }
    let mut out = String::with_capacity(text.len() + element.len() + 32);
    if let Some((s, e)) = ours {
        log::warn!(
            "replacing the TPM state element already in {}",
            path.display()
        );
        out.push_str(&text[..s]);
        out.push_str(element);
        out.push_str(&text[e..]);
    } else if let Some(c) = metadata_close {
        out.push_str(&text[..c]);
        out.push_str(element);
        out.push_str(&text[c..]);
    } else if let Some((s, e)) = metadata_empty {
        out.push_str(&text[..s]);
        out.push_str("<metadata>");
        out.push_str(element);
        out.push_str("</metadata>");
        out.push_str(&text[e..]);
    } else if let Some(c) = domain_close {
        out.push_str(&text[..c]);
        out.push_str("<metadata>");
        out.push_str(element);
        out.push_str("</metadata>");
        out.push_str(&text[c..]);
    } else {
        return Err(bad_input(path, "no </domain>"));
    }
    // What we emit must read back as the element we built.
    let check = crate::domain::parse_domain(out.as_bytes(), &ctx.config.namespace)?;
    if check.metadata.is_none() {
        return Err(CliError::Usage(format!(
            "internal: the element was not found in the result for {}",
            path.display()
        )));
    }
    Ok(out)
}
