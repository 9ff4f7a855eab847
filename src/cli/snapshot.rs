//! `snapshot revert` and `snapshot create`: drop-ins for `virsh
//! snapshot-revert` and `virsh snapshot-create-as` that keep the TPM state
//! and VARS with the disks (docs/SNAPSHOTS.md).
//!
//! A revert records a revert intent naming the snapshot element's digest
//! before libvirt reverts; the hook's next `prepare` with that element then
//! restores it whatever the local state (backing the local state up), and
//! `store` writes nothing over it meanwhile. libvirt itself is driven by
//! virsh, with the caller's options passed through unchanged.

use super::{CliError, Ctx, SnapshotArgs};
use crate::domain::{parse_domain, parse_snapshot};
use crate::format::read_header;
use crate::fs::{HostData, RevertIntent};
use crate::libvirt::{virsh, DomainHandle, Libvirt};
use crate::name::DomainName;
use crate::store::{store_domain, StoreOptions};

/// The digest of the element inside snapshot `name`'s definition, if any.
fn snapshot_element(
    ctx: &Ctx,
    dom: &DomainHandle,
    snapshot: &str,
) -> Result<Option<crate::state::Sha256Sum>, CliError> {
    let xml = dom.snapshot_xml(snapshot)?;
    let Some(inner) = parse_snapshot(xml.as_bytes())?.domain else {
        return Ok(None);
    };
    let info = parse_domain(inner, &ctx.config.namespace)?;
    match &info.metadata {
        None => Ok(None),
        Some(el) => {
            let (_, digest) = read_header(el).map_err(|source| CliError::InvalidElement {
                context: format!(
                    "VM {}, snapshot {}",
                    dom.name.clone(),
                    DomainName::new(snapshot)
                ),
                source,
            })?;
            Ok(Some(digest))
        }
    }
}

/// `snapshot revert DOMAIN SNAPSHOT [virsh options]`.
pub(crate) fn revert(ctx: &Ctx, args: &SnapshotArgs) -> Result<(), CliError> {
    let lv = Libvirt::connect(&ctx.uri, false)?;
    let mut dom = lv.domain(&args.domain)?;
    let element = snapshot_element(ctx, &dom, &args.snapshot)?;
    let host = HostData::new(&ctx.paths);
    let name = dom.name.clone();
    let snap = DomainName::new(args.snapshot.as_str());
    if let Some(digest) = element {
        // Before libvirt reverts: a revert that starts the VM runs the
        // hook's prepare at once, and the post-stop store of a running VM
        // must already see it.
        host.write_revert(
            &dom.uuid,
            &RevertIntent {
                digest,
                snapshot: args.snapshot.clone(),
                by: "cli".into(),
            },
        )?;
    }
    let words = [
        "snapshot-revert",
        "--domain",
        dom.uuid.as_str(),
        "--snapshotname",
        &args.snapshot,
    ];
    if let Err(e) = virsh(
        &ctx.uri,
        &dom.name,
        "snapshot-revert",
        &words,
        &args.virsh_args,
    ) {
        // libvirt did not revert: no start may take the snapshot's state.
        if element.is_some() {
            host.clear_revert(&dom.uuid)?;
        }
        return Err(e.into());
    }
    dom.refresh()?;
    match element {
        None => crate::say!(
            "VM {name}: reverted to snapshot {snap}; it holds no TPM state element (taken before this VM's state was stored), so only libvirt's own state came back"
        ),
        Some(d) if host.read_revert(&dom.uuid)?.is_none() => crate::say!(
            "VM {name}: reverted to snapshot {snap} and started with its TPM state (element {}); the replaced state is in a backup",
            d.short()
        ),
        Some(d) => crate::say!(
            "VM {name}: reverted to snapshot {snap}; its next start restores the snapshot's TPM state (element {}) and backs up the current one",
            d.short()
        ),
    }
    Ok(())
}

/// `snapshot create DOMAIN NAME [virsh options]`: store first, so the
/// snapshot's element is current (a running VM is paused for the store and
/// the snapshot, then resumed), then `virsh snapshot-create-as`.
pub(crate) fn create(ctx: &Ctx, args: &SnapshotArgs) -> Result<(), CliError> {
    let lv = Libvirt::connect(&ctx.uri, false)?;
    let dom = lv.domain(&args.domain)?;
    let name = dom.name.clone();
    let paused_here = dom.active && !dom.is_paused()?;
    if paused_here {
        dom.suspend()?;
    }
    let result = store_domain(ctx, &dom, StoreOptions::default())
        .map_err(CliError::from)
        .and_then(|done| {
            let words = [
                "snapshot-create-as",
                "--domain",
                dom.uuid.as_str(),
                "--name",
                &args.snapshot,
            ];
            virsh(
                &ctx.uri,
                &dom.name,
                "snapshot-create-as",
                &words,
                &args.virsh_args,
            )?;
            Ok(done)
        });
    if paused_here {
        if let Err(e) = dom.resume() {
            log::warn!("VM {name}: {e}");
        }
    }
    let done = result?;
    // `show --snapshot` tells from this record that the element was current.
    if let Err(e) =
        HostData::new(&ctx.paths).record_snapshot(&dom.uuid, &args.snapshot, &done.m.digest)
    {
        log::warn!("VM {name}: {e}");
    }
    crate::say!(
        "VM {name}: snapshot {} holds the current TPM state (generation {}, digest {})",
        DomainName::new(args.snapshot.as_str()),
        done.m.provenance.generation,
        done.m.digest.short()
    );
    Ok(())
}
