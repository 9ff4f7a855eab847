//! `show`/`verify`, `restore` and `extract`: reading the element, and the
//! hook's prepare logic run by hand.

use super::{read_input, CliError, Ctx, ExtractArgs, RestoreArgs, ShowArgs, SourceArgs};
use crate::carried::{Carried, Running};
use crate::domain::{parse_domain, DomainInfo};
use crate::exit::Exit;
use crate::format::{decode, read_header, DecodeLimits, FormatError, MetadataState};
use crate::fs::load_keyring;
use crate::fs::HostData;
use crate::input::parse_input;
use crate::libvirt::{Libvirt, LibvirtError};
use crate::name::DomainName;
use crate::restore::{prepare_domain, prepare_domain_locked, reader_check, PrepareOptions};
use crate::swtpm::check_header;
use std::time::Duration;

/// Where the XML came from, for messages.
struct Source {
    info: DomainInfo,
    /// false: a bare element (no domain to check it against).
    bound: bool,
    from: String,
    /// Whether libvirt says the domain runs (`None`: not asked / unknown).
    active: Option<bool>,
    /// `show --snapshot`: what the snapshot says about itself.
    snapshot: Option<SnapshotFacts>,
}

struct SnapshotFacts {
    name: String,
    created: Option<i64>,
    state: Option<String>,
    /// The element digest `snapshot create` recorded on this host.
    recorded: Option<crate::state::Sha256Sum>,
}

fn load(ctx: &Ctx, src: &SourceArgs, snapshot: Option<&str>) -> Result<Source, CliError> {
    match (&src.domain, &src.xml) {
        (_, Some(path)) => {
            let bytes = read_input(path)?;
            let input = parse_input(&bytes, &ctx.config.namespace)?;
            Ok(Source {
                info: input.info,
                bound: input.domain_bound,
                from: if path.as_os_str() == "-" {
                    "stdin".into()
                } else {
                    path.display().to_string()
                },
                active: None,
                snapshot: None,
            })
        }
        (Some(name), None) => {
            // Reading needs no write access: a read-only connection is enough.
            let lv = Libvirt::connect(&ctx.uri, ctx.readonly || !nix::unistd::geteuid().is_root())
                .or_else(|_| Libvirt::connect(&ctx.uri, true))?;
            let dom = lv.domain(name)?;
            if let Some(snap) = snapshot {
                let xml = dom.snapshot_xml(snap)?;
                let parsed = crate::domain::parse_snapshot(xml.as_bytes())?;
                let inner = parsed.domain.ok_or_else(|| {
                    CliError::NoElement(format!(
                        "VM {}: snapshot {} holds no domain definition",
                        dom.name.clone(),
                        DomainName::new(snap)
                    ))
                })?;
                // Root only: without it, "unknown" is the honest answer.
                let recorded = HostData::new(&ctx.paths)
                    .snapshot_record(&dom.uuid, snap)
                    .ok()
                    .flatten();
                return Ok(Source {
                    info: parse_domain(inner, &ctx.config.namespace)?,
                    bound: true,
                    from: format!("libvirt {} (snapshot {})", lv.uri(), DomainName::new(snap)),
                    active: Some(dom.active),
                    snapshot: Some(SnapshotFacts {
                        name: snap.to_string(),
                        created: parsed.created,
                        state: parsed.state,
                        recorded,
                    }),
                });
            }
            let xml = if src.inactive && dom.persistent {
                dom.inactive_xml()?
            } else {
                dom.xml()?
            };
            Ok(Source {
                info: parse_domain(xml.as_bytes(), &ctx.config.namespace)?,
                bound: true,
                from: format!(
                    "libvirt {} ({})",
                    lv.uri(),
                    if src.inactive { "config" } else { "current" }
                ),
                active: Some(dom.active),
                snapshot: None,
            })
        }
        (None, None) => Err(CliError::Usage("name a domain or pass --xml FILE".into())),
    }
}

#[derive(serde::Serialize)]
struct FileJson {
    /// `tpm`, `nvram` or `varstore`.
    section: &'static str,
    name: String,
    size: usize,
    sha256: String,
    swtpm_encrypted: bool,
}

#[derive(serde::Serialize)]
struct LocalJson {
    path: String,
    digest: Option<String>,
    matches: Option<bool>,
    error: Option<String>,
}

#[derive(serde::Serialize)]
struct ShowJson {
    domain: String,
    uuid: String,
    source: String,
    present: bool,
    valid: bool,
    /// Why the reader refuses (or the check failed): `{kind, exit, message}`.
    error: Option<serde_json::Value>,
    format: Option<String>,
    element_uuid: Option<String>,
    belongs_to_domain: Option<bool>,
    generation: Option<u64>,
    digest: Option<String>,
    parent: Option<String>,
    stored: Option<String>,
    host: Option<String>,
    tpm_version: Option<String>,
    files: Vec<FileJson>,
    protection: Option<String>,
    /// Key id the element needs and this host lacks.
    missing_key: Option<String>,
    local: Option<LocalJson>,
    /// `show --snapshot`, else null.
    snapshot: Option<SnapshotJson>,
}

#[derive(serde::Serialize)]
struct SnapshotJson {
    name: String,
    /// RFC 3339 UTC, from `<creationTime>`.
    created: Option<String>,
    /// The domain's state when taken (`running`, `shutoff`, `disk-snapshot`, …).
    state: Option<String>,
    /// true: `snapshot create` stored the state right before taking it (this
    /// host's record matches the element); null: not known.
    element_current: Option<bool>,
}

/// `virt-tpm-state:<key ids>`, `recipients:<fingerprints>`, `swtpm`, joined
/// by `+`, or `none`.
fn protection(m: &MetadataState) -> String {
    let swtpm = m
        .state
        .tpm
        .as_ref()
        .is_some_and(crate::swtpm::state_is_encrypted);
    let mut parts = Vec::new();
    if !m.sealed_with.is_empty() {
        let ids: Vec<&str> = m.sealed_with.iter().map(|k| k.as_str()).collect();
        parts.push(format!("virt-tpm-state:{}", ids.join(",")));
    }
    if !m.sealed_for.is_empty() {
        let mut fps: Vec<&str> = m.sealed_for.iter().map(|f| f.as_str()).collect();
        fps.sort_unstable();
        parts.push(format!("recipients:{}", fps.join(",")));
    }
    if swtpm {
        parts.push("swtpm".to_string());
    }
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join("+")
    }
}

pub(crate) fn show(ctx: &Ctx, args: &ShowArgs) -> Result<(), CliError> {
    let src = load(ctx, &args.source, args.snapshot.as_deref())?;
    let info = &src.info;
    let name = info.name.clone();
    let limits = DecodeLimits {
        max_file_size: ctx.config.max_file_size,
    };
    // Without root the keys are unreadable; show what can be shown, and say
    // why when the keys exist but cannot be used.
    let sealed = info
        .metadata
        .as_ref()
        .is_some_and(crate::restore::el_is_sealed);
    let keys = match sealed.then(|| load_keyring(&ctx.paths)) {
        Some(Ok(k)) => {
            for bad in k.rejected() {
                log::warn!("key file {} skipped: {}", bad.file, bad.why);
            }
            k
        }
        // A keys dir others can write is refused, never read around; so is
        // a dir named with --keys that cannot be opened.
        Some(Err(e))
            if e.exit_code() == Exit::UnsafePath || ctx.paths.keys_override().is_some() =>
        {
            return Err(e.into())
        }
        Some(Err(e)) => {
            log::warn!("host keys not loaded: {e}");
            Default::default()
        }
        // A plaintext element needs no keys.
        None => Default::default(),
    };
    let decoded = info.metadata.as_ref().map(|el| decode(el, limits, &keys));
    // The reader rules that compare the element with its domain (uuid
    // binding, TPM version, swtpm encryption): what the hook refuses.
    let refused = match &decoded {
        Some(Ok(m)) => reader_check(info, m, &ctx.config.namespace, src.bound).err(),
        _ => None,
    };
    let local = if src.bound {
        local_state(ctx, info, src.active.into())
    } else {
        None
    };
    let mut j = ShowJson {
        domain: info.name.as_str().to_owned(),
        uuid: info.uuid.to_string(),
        source: src.from.clone(),
        present: decoded.is_some(),
        valid: matches!(decoded, Some(Ok(_))) && refused.is_none(),
        error: None,
        format: info
            .metadata
            .as_ref()
            .and_then(|e| e.attr("format").map(str::to_string)),
        element_uuid: None,
        belongs_to_domain: None,
        generation: None,
        digest: None,
        parent: None,
        stored: None,
        host: None,
        tpm_version: None,
        files: Vec::new(),
        protection: None,
        missing_key: None,
        local: None,
        snapshot: None,
    };
    match &decoded {
        Some(Ok(m)) => {
            j.element_uuid = Some(m.provenance.uuid.to_string());
            j.belongs_to_domain = Some(m.provenance.uuid == info.uuid);
            j.generation = Some(m.provenance.generation);
            j.digest = Some(m.digest.hex());
            j.parent = m.provenance.parent.map(|p| p.hex());
            j.stored = Some(m.provenance.stored.clone());
            j.host = Some(m.provenance.host.clone());
            j.tpm_version = m.state.tpm.as_ref().map(|t| t.version.to_string());
            j.protection = Some(protection(m));
            j.files = m
                .state
                .sections()
                .into_iter()
                .map(|(section, f)| FileJson {
                    section,
                    name: f.name.clone(),
                    size: f.data.len(),
                    sha256: f.sha256().hex(),
                    swtpm_encrypted: section == "tpm"
                        && check_header(&f.data).is_ok_and(|h| h.is_encrypted()),
                })
                .collect();
        }
        Some(Err(e)) => {
            let exit = e.exit_code();
            j.error = Some(super::error_member(
                if exit == Exit::Key {
                    "key"
                } else {
                    "invalid-element"
                },
                exit,
                &format!(
                    "virt-tpm-state: VM {} ({}): the TPM state element is invalid: {e}",
                    name, src.from
                ),
            ));
            if let FormatError::MissingKey { key_id, .. }
            | FormatError::UnusableKey { key_id, .. } = e
            {
                j.missing_key = Some(key_id.to_string());
            }
            // What can be read without opening the files.
            if let Some(Ok((p, d))) = info.metadata.as_ref().map(read_header) {
                j.element_uuid = Some(p.uuid.to_string());
                j.belongs_to_domain = Some(p.uuid == info.uuid);
                j.generation = Some(p.generation);
                j.digest = Some(d.hex());
                j.parent = p.parent.map(|x| x.hex());
                j.stored = Some(p.stored);
                j.host = Some(p.host);
            }
            // Sections and files are readable without keys (their
            // attributes are in clear).
            if let Some(el) = info.metadata.as_ref() {
                for sec in &el.children {
                    let section = match sec.name.as_str() {
                        "tpm" => {
                            j.tpm_version = sec.attr("version").map(str::to_string);
                            "tpm"
                        }
                        "nvram" => "nvram",
                        "varstore" => "varstore",
                        _ => continue,
                    };
                    for f in sec.children.iter().filter(|f| f.name == "file") {
                        j.files.push(FileJson {
                            section,
                            name: f.attr("name").unwrap_or_default().to_string(),
                            size: f.attr("size").and_then(|s| s.parse().ok()).unwrap_or(0),
                            sha256: f.attr("sha256").unwrap_or_default().to_string(),
                            swtpm_encrypted: false,
                        });
                    }
                }
            }
        }
        None => {}
    }
    if let Some(Local {
        path,
        sections: (tpm, nvram),
        digest: result,
    }) = local
    {
        j.local = Some(match result {
            Ok(digest) => LocalJson {
                path,
                // The element restricted to what the domain carries here.
                matches: match (&decoded, digest) {
                    (Some(Ok(m)), Some(d)) => Some(m.state.only(tpm, nvram).digest() == d),
                    _ => None,
                },
                digest: digest.map(|d| d.hex()),
                error: None,
            },
            Err(e) => LocalJson {
                path,
                digest: None,
                matches: None,
                error: Some(e),
            },
        });
    }
    if let (None, Some(e)) = (&j.error, &refused) {
        j.error = Some(super::error_member(
            super::restore_kind(e),
            e.exit_code(),
            &format!("virt-tpm-state: {e}"),
        ));
    }
    if let (true, None) = (args.check, &info.metadata) {
        j.error = Some(
            CliError::NoElement(format!(
                "VM {}: no TPM state element (namespace {}) in {}",
                name, ctx.config.namespace, src.from
            ))
            .json()["error"]
                .clone(),
        );
    }
    if let Some(f) = &src.snapshot {
        let element = info
            .metadata
            .as_ref()
            .and_then(|el| read_header(el).ok())
            .map(|(_, d)| d);
        j.snapshot = Some(SnapshotJson {
            name: f.name.clone(),
            created: f.created.and_then(|t| u64::try_from(t).ok()).map(|t| {
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(t),
                )
                .to_string()
            }),
            state: f.state.clone(),
            element_current: (element.is_some() && f.recorded == element).then_some(true),
        });
    }
    if j.stored.as_deref() == Some("") {
        j.stored = None;
    }
    if j.host.as_deref() == Some("") {
        j.host = None;
    }
    if args.json {
        crate::outln!(
            "{}",
            crate::logging::json_safe(&serde_json::to_string_pretty(&j).expect("serializable"))
        );
        super::JSON_PRINTED.store(true, std::sync::atomic::Ordering::SeqCst);
    } else {
        print_human(&j, src.active);
    }
    if args.check {
        return match decoded {
            None => Err(CliError::NoElement(format!(
                "VM {}: no TPM state element (namespace {}) in {}",
                name, ctx.config.namespace, src.from
            ))),
            Some(Err(source)) => Err(CliError::InvalidElement {
                context: format!("VM {} ({})", name, src.from),
                source,
            }),
            Some(Ok(_)) => match refused {
                Some(e) => Err(e.into()),
                None => Ok(()),
            },
        };
    }
    Ok(())
}

/// The digest of this host's local state for the domain (one rule with
/// `status` and `watch`: [`Carried::read_local`]), and where it was looked
/// for.
fn local_state(ctx: &Ctx, info: &DomainInfo, running: Running) -> Option<Local> {
    let carried = Carried::of(&ctx.paths, &ctx.config, info).ok()?;
    let mut paths: Vec<String> = Vec::new();
    if let Some((_, l)) = &carried.tpm {
        paths.push(l.path().display().to_string());
    }
    if let Some(l) = &carried.nvram {
        paths.push(l.path().display().to_string());
    }
    if paths.is_empty() {
        return None;
    }
    // Compared over the sections the domain carries here (`Carried::sections`).
    let sections = carried.sections();
    let host = HostData::new(&ctx.paths);
    let read = carried.read_local(
        &host,
        &info.uuid,
        sections,
        running,
        ctx.config.max_file_size,
    );
    Some(Local {
        path: paths.join(" + "),
        sections,
        digest: read
            .map(|s| s.map(|s| s.digest()))
            .map_err(|e| e.to_string()),
    })
}

/// This host's local state of a domain, as `show` reports it.
struct Local {
    path: String,
    /// The sections (TPM, VARS) compared: those that apply here.
    sections: (bool, bool),
    digest: Result<Option<crate::state::Sha256Sum>, String>,
}

fn print_human(j: &ShowJson, active: Option<bool>) {
    let state = match active {
        Some(true) => ", running",
        Some(false) => ", shut off",
        None => "",
    };
    crate::say!("VM '{}' ({}{state}) from {}", j.domain, j.uuid, j.source);
    if let Some(snap) = &j.snapshot {
        crate::say!(
            "  snapshot:    {}, taken {} at {}; its element was current then: {}",
            snap.name,
            snap.state.as_deref().unwrap_or("?"),
            snap.created.as_deref().unwrap_or("?"),
            match snap.element_current {
                Some(true) => "yes (stored right before by `virt-tpm-state snapshot create`)",
                _ => "unknown (not taken with `virt-tpm-state snapshot create` on this host; the TPM may have changed after `stored` below)",
            }
        );
    }
    if !j.present {
        crate::say!("  metadata:    no virt-tpm-state element");
    } else if let Some(key) = &j.missing_key {
        crate::say!("  metadata:    encrypted with key {key}, which this host does not have: copy it into /etc/virt-tpm-state/keys/ (0600)");
        if let (Some(g), Some(d)) = (j.generation, &j.digest) {
            crate::say!("  generation:  {g}, digest {}…", &d[..12]);
        }
    } else if let Some(e) = &j.error {
        let m = e["message"].as_str().unwrap_or("");
        crate::say!(
            "  metadata:    INVALID: {}",
            m.strip_prefix("virt-tpm-state: ").unwrap_or(m)
        );
    } else {
        crate::say!(
            "  metadata:    valid, format {}",
            j.format.as_deref().unwrap_or("?")
        );
        crate::say!(
            "  generation:  {} (parent {})",
            j.generation.unwrap_or(0),
            j.parent
                .as_deref()
                .map_or("none".to_string(), |p| format!("{}…", &p[..12]))
        );
        crate::say!(
            "  stored:      {} on {}",
            j.stored.as_deref().unwrap_or("?"),
            j.host.as_deref().unwrap_or("?")
        );
        crate::say!(
            "  digest:      {}…",
            &j.digest.as_deref().unwrap_or("????????????")[..12]
        );
        if j.belongs_to_domain == Some(false) {
            crate::say!(
                "  owner:       domain {} (a clone: the hook refuses to start with it; see `virt-tpm-state adopt`)",
                j.element_uuid.as_deref().unwrap_or("?")
            );
        }
        let tpm_files = j.files.iter().filter(|f| f.section == "tpm").count();
        if let Some(v) = &j.tpm_version {
            crate::say!("  TPM:         {v}, {tpm_files} file(s)");
        } else {
            crate::say!("  TPM:         none (UEFI variables only)");
        }
        for f in &j.files {
            let label = match f.section {
                "nvram" => "  (UEFI variables, nvram)",
                "varstore" => "  (UEFI variables, varstore)",
                _ => "",
            };
            crate::say!(
                "    {}  {} bytes  sha256 {}…{label}",
                f.name,
                f.size,
                &f.sha256[..12]
            );
        }
        let p = j.protection.as_deref().unwrap_or("none");
        crate::say!(
            "  protection:  {}",
            if let Some(ids) = p.strip_prefix("virt-tpm-state:") {
                format!("encrypted with host key {ids} (readers of the XML without the key see ciphertext)")
            } else if p == "swtpm" {
                "swtpm's own encryption (<encryption secret=...>): the blob is ciphertext"
                    .to_string()
            } else {
                "none: the state is readable by anyone who can read this domain XML".to_string()
            }
        );
    }
    if let Some(l) = &j.local {
        let what = match (&l.error, &l.digest, l.matches) {
            (Some(e), _, _) => format!("unreadable: {e}"),
            (None, None, _) => "none on this host".to_string(),
            (None, Some(_), Some(true)) => "matches the metadata".to_string(),
            (None, Some(d), Some(false)) => {
                format!("differs from the metadata (local {}…)", &d[..12])
            }
            (None, Some(d), None) => format!("digest {}…", &d[..12]),
        };
        crate::say!("  local state: {what} ({})", l.path);
    }
}

pub(crate) fn restore(ctx: &Ctx, args: &RestoreArgs) -> Result<(), CliError> {
    let source = SourceArgs {
        domain: args.source.domain.clone(),
        xml: args.source.xml.clone(),
        // The definition the next start uses.
        inactive: true,
    };
    let mut src = load(ctx, &source, None)?;
    // A definition from libvirt is read again under the domain's lock: a
    // `store` finishing in between would otherwise leave this restore with
    // the element it replaced, which it would take for a new one (and roll
    // the newer local state back). A saved XML cannot change under us.
    let lock = match &source.domain {
        Some(_) => {
            let host = HostData::new(&ctx.paths);
            let lock = host.lock(
                &src.info.uuid,
                Duration::from_secs(ctx.config.lock_timeout_secs),
            )?;
            // By UUID: the domain locked, even if renamed meanwhile.
            src = load(
                ctx,
                &SourceArgs {
                    domain: Some(src.info.uuid.as_str().to_string()),
                    xml: None,
                    inactive: true,
                },
                None,
            )?;
            Some(lock)
        }
        None => None,
    };
    let name = src.info.name.clone();
    let running = match src.active {
        Some(a) => a,
        // A saved XML: ask libvirt whether a domain with that UUID runs here.
        // Not knowing is not "stopped": while libvirtd restarts, a running
        // VM's swtpm keeps running over whatever dir a restore swaps in.
        None => match Libvirt::connect(&ctx.uri, true)
            .and_then(|lv| lv.domain(src.info.uuid.as_str()).map(|d| d.active))
        {
            Ok(active) => active,
            Err(LibvirtError::NoDomain(_)) => false,
            Err(source) if args.force => {
                log::warn!(
                    "VM {}: cannot ask libvirt whether it runs ({source}); --force: restoring as if it were stopped",
                    name
                );
                false
            }
            Err(source) => {
                return Err(CliError::CannotTellRunning {
                    name: name.to_string(),
                    source,
                })
            }
        },
    };
    if running {
        return Err(CliError::Running(name.to_string()));
    }
    if src.info.metadata.is_none() {
        return Err(CliError::NoElement(format!(
            "VM {}: no TPM state element in {}; nothing to restore",
            name, src.from
        )));
    }
    let options = PrepareOptions {
        force_metadata: args.force,
    };
    let report = match &lock {
        Some(lock) => prepare_domain_locked(&ctx.paths, &ctx.config, &src.info, options, lock)?,
        None => prepare_domain(&ctx.paths, &ctx.config, &src.info, options)?,
    };
    crate::say!("{}", report.summary());
    Ok(())
}

pub(crate) fn extract(ctx: &Ctx, args: &ExtractArgs) -> Result<(), CliError> {
    let bytes = read_input(&args.xml)?;
    let input = parse_input(&bytes, &ctx.config.namespace)?;
    let info = &input.info;
    let el = info.metadata.as_ref().ok_or_else(|| {
        CliError::NoElement(format!(
            "{}: no TPM state element (namespace {})",
            args.xml.display(),
            ctx.config.namespace
        ))
    })?;
    let m = decode(
        el,
        DecodeLimits {
            max_file_size: ctx.config.max_file_size,
        },
        // A plaintext element needs no keys (and no root).
        &if crate::restore::el_is_sealed(el) {
            load_keyring(&ctx.paths)?
        } else {
            Default::default()
        },
    )
    .map_err(|source| CliError::InvalidElement {
        context: args.xml.display().to_string(),
        source,
    })?;
    // What `verify` refuses is not extracted, unless asked for.
    if let Err(e) = reader_check(info, &m, &ctx.config.namespace, input.domain_bound) {
        if !args.force {
            return Err(e.into());
        }
        log::warn!("extracting anyway (--force): {e}");
    }
    // Names were checked against the allow-list by `decode`: no path can
    // leave DIR, and files are created O_EXCL|O_NOFOLLOW inside it.
    let out = crate::fs::open_user_dir(&args.out, true)?.expect("created");
    for (_, f) in m.state.sections() {
        out.create_new_file(&f.name, &f.data, 0o600)?;
        crate::say!(
            "{}  {} bytes  sha256 {}",
            args.out.join(&f.name).display(),
            f.data.len(),
            f.sha256().hex()
        );
    }
    Ok(())
}
