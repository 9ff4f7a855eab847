//! `keygen`, `host-id` and `rekey`: host keys and age identities that protect the element.

use super::{CliError, Ctx, HostIdArgs, RekeyArgs};
use crate::domain::parse_domain;
use crate::envelope::{os_random, Keyring, SecretKey};
use crate::format::{decode, encode, DecodeLimits, MetadataState, Protection, Style};
use crate::fs::{
    create_host_identity, create_key, host_identity_path, load_host_identity, load_keyring,
    load_recipients,
};
use crate::libvirt::{DomainHandle, Libvirt};
use crate::recipients::{generate_identity, RecipientSet};
use crate::store::plan::Targets;
use age::secrecy::ExposeSecret;

pub(crate) fn keygen(ctx: &Ctx) -> Result<(), CliError> {
    let key = SecretKey::generate(&mut os_random);
    let (id, path) = create_key(&ctx.paths, &key)?;
    crate::say!(
        "created key {id} at {} (0600); new stores use it. Copy it (same name, mode 0600) to every host that may run these VMs",
        path.display()
    );
    Ok(())
}

/// Creates a key when the host has none (used by `install`); says so.
pub(crate) fn ensure_key(ctx: &Ctx) -> Result<(), CliError> {
    if load_keyring(&ctx.paths)?.is_empty() {
        keygen(ctx)?;
    }
    Ok(())
}

/// Creates this host's age identity when it has none (used by `install`).
pub(crate) fn ensure_host_identity(ctx: &Ctx) -> Result<(), CliError> {
    if load_host_identity(&ctx.paths)?.is_none() {
        let path = create_identity(ctx)?.expect("no identity was there");
        crate::say!(
            "created this host's age identity at {} (0600); `virt-tpm-state host-id` prints its recipient",
            path.display()
        );
    }
    Ok(())
}

fn create_identity(ctx: &Ctx) -> Result<Option<std::path::PathBuf>, CliError> {
    let (text, _) = generate_identity(&format!(
        "virt-tpm-state host identity of {}, created {}",
        super::this_host(),
        super::now_stamp()
    ));
    Ok(create_host_identity(&ctx.paths, text.expose_secret())?)
}

/// `host-id [init]`: this host's age identity. The recipient goes to
/// stdout as a recipients-file snippet (a `#` comment, then `age1…`), so
/// `virt-tpm-state host-id > recipients.d/HOST.txt` on a manager works.
pub(crate) fn host_id(ctx: &Ctx, args: &HostIdArgs) -> Result<(), CliError> {
    if args.action.as_deref() == Some("init") {
        match create_identity(ctx)? {
            Some(path) => eprintln!(
                "virt-tpm-state: created this host's identity at {} (0600); add the recipient below to recipients.d/ on the hosts that seal this host's VMs",
                path.display()
            ),
            None => eprintln!(
                "virt-tpm-state: this host already has an identity at {}; kept it",
                host_identity_path(&ctx.paths).display()
            ),
        }
    }
    let ids = match load_host_identity(&ctx.paths)? {
        None => {
            return Err(CliError::Key(format!(
                "this host has no identity ({} is missing); create one with `virt-tpm-state host-id init`",
                host_identity_path(&ctx.paths).display()
            )))
        }
        Some(Err(why)) => return Err(CliError::Key(why)),
        Some(Ok(ids)) => ids,
    };
    for id in ids {
        let (Some(recipient), Some(fp)) = (&id.recipient, &id.fingerprint) else {
            return Err(CliError::Key(format!(
                "{}: a plugin identity without a `# recipient: age1…` comment; add the recipient the plugin printed as that comment",
                id.origin
            )));
        };
        crate::logging::out(&format!(
            "# host {} (fingerprint {fp})\n{recipient}\n",
            crate::logging::escaped(&super::this_host())
        ));
    }
    Ok(())
}

/// What `rekey` does to one element.
enum Plan<'a> {
    Skip(String),
    Fail(String),
    Write(Protection<'a>, String),
}

fn plan<'a>(
    args: &RekeyArgs,
    m: &'a MetadataState,
    keys: &'a Keyring,
    recipients: Option<&'a RecipientSet>,
    fill: &'a mut dyn FnMut(&mut [u8]),
) -> Plan<'a> {
    let generation = m.provenance.generation;
    let age_sealed = !m.sealed_for.is_empty();
    if age_sealed || args.to_recipients {
        let Some(set) = recipients else {
            return Plan::Fail(
                "no recipients are configured for it here (recipients.d/); left as it is".into(),
            );
        };
        let fps = crate::recipients::joined(&set.fingerprints());
        if !age_sealed {
            return Plan::Write(
                Protection::Recipients { set },
                format!("converted generation {generation} to recipients {fps}"),
            );
        }
        if args.rotate {
            return Plan::Write(
                Protection::Recipients { set },
                format!("re-encrypted generation {generation} with fresh file keys for recipients {fps}"),
            );
        }
        let mut have = m.sealed_for.clone();
        have.sort();
        if have == set.fingerprints() && m.sealed_with.is_empty() {
            return Plan::Skip(format!("already sealed for recipients {fps}"));
        }
        return Plan::Write(
            Protection::Rewrap {
                from: &m.age_files,
                identities: keys.identities(),
                set,
            },
            format!(
                "re-wrapped generation {generation} for recipients {fps} (ciphertext unchanged)"
            ),
        );
    }
    let Some((newest_id, newest)) = keys.newest() else {
        return Plan::Skip(
            "not sealed for recipients and no host key here; left as it is (`rekey --to-recipients` converts it)".into(),
        );
    };
    if m.sealed_with == [newest_id.clone()] {
        return Plan::Skip(format!("already encrypted with key {newest_id}"));
    }
    Plan::Write(
        Protection::Sealed {
            key_id: newest_id,
            key: newest,
            fill,
        },
        format!("re-encrypted generation {generation} with key {newest_id}"),
    )
}

pub(crate) fn rekey(ctx: &Ctx, args: &RekeyArgs) -> Result<(), CliError> {
    let keys = load_keyring(&ctx.paths)?;
    let lv = Libvirt::connect(&ctx.uri, ctx.readonly)?;
    let domains: Vec<DomainHandle> = match &args.domain {
        Some(d) => vec![lv.domain(d)?],
        None => lv.all_domains()?,
    };
    let limits = DecodeLimits {
        max_file_size: ctx.config.max_file_size,
    };
    let mut failures = 0;
    for dom in domains {
        let name = dom.name.clone();
        let recipients = load_recipients(&ctx.paths, dom.uuid.as_str())?;
        if keys.is_empty() && recipients.is_none() {
            return Err(CliError::Key(format!(
                "no key in {} and no recipients in {}; create a key with `virt-tpm-state keygen` or name recipients",
                crate::fs::keys_dir(&ctx.paths).display(),
                crate::fs::recipients_dir(&ctx.paths).display()
            )));
        }
        // Each copy of the definition on its own: live and config may differ.
        let mut copies = Vec::new();
        if dom.active {
            copies.push((
                dom.xml()?,
                Targets {
                    live: true,
                    config: false,
                },
            ));
        }
        if dom.persistent {
            copies.push((
                dom.inactive_xml()?,
                Targets {
                    live: false,
                    config: true,
                },
            ));
        }
        for (xml, targets) in copies {
            let which = if targets.live { "live" } else { "config" };
            let vm = format!("VM {name} ({which})");
            let info = parse_domain(xml.as_bytes(), &ctx.config.namespace)?;
            let Some(el) = &info.metadata else {
                if args.domain.is_some() {
                    crate::say!("VM {name}: no TPM state in the {which} metadata");
                }
                continue;
            };
            let fail = |why: &str| {
                eprintln!(
                    "{}",
                    crate::logging::escaped(&format!("virt-tpm-state: {vm}: {why}"))
                );
            };
            let m = match decode(el, limits, &keys) {
                Ok(m) => m,
                Err(e) => {
                    fail(&format!("{e}; left as it is"));
                    failures += 1;
                    continue;
                }
            };
            let mut fill = os_random;
            match plan(args, &m, &keys, recipients.as_ref(), &mut fill) {
                Plan::Skip(line) => crate::say!("{vm}: {line}"),
                Plan::Fail(why) => {
                    fail(&why);
                    failures += 1;
                }
                Plan::Write(protection, line) => {
                    // Same state, same provenance: only the protection changes.
                    match encode(&m.state, &m.provenance, Style::ForSetMetadata, protection) {
                        Ok(element) => {
                            dom.write_state_element(&element, &ctx.config.namespace, targets)?;
                            crate::say!("{vm}: {line}");
                        }
                        Err(e) => {
                            fail(&format!("{e}; left as it is"));
                            failures += 1;
                        }
                    }
                }
            }
        }
    }
    if failures > 0 {
        return Err(CliError::Key(format!(
            "{failures} element(s) could not be rekeyed (see above)"
        )));
    }
    Ok(())
}
