//! The restore decision on `prepare` (README, "How the hook decides"). Pure.
//!
//! M = the state in the metadata, J = the digest this host last synced with
//! the metadata for this UUID, L = the local state (the live state dir, or
//! when libvirt deleted it, the copy kept at the last stop).
//!
//! | case                              | decision                                   |
//! |-----------------------------------|--------------------------------------------|
//! | incoming migration / save restore | nothing (the state travels with the VM)    |
//! | no M                              | nothing                                    |
//! | M invalid                         | refuse (checked by the caller, before this)|
//! | M.uuid != domain uuid             | refuse: a clone                            |
//! | an explicit revert to M (R)       | M (nothing if M == L); L is backed up      |
//! | M == L                            | nothing (or put the kept copy back)        |
//! | M == J, L != J                    | L is newer: keep it (or put it back)       |
//! | otherwise                         | M wins; L, if any, is backed up first      |
//!
//! "Otherwise" with L present and L != J is a true conflict (both sides moved,
//! or this host never synced): the `refuse` policy stops there instead.
//!
//! R is a snapshot revert recorded for exactly this element (its digest):
//! `snapshot revert`, or the watch daemon seeing libvirt's from-snapshot
//! event; or libvirt's own `release` reason `from snapshot` (>= 10.5) for
//! this VM minutes before (the revert stopped it; this start is its own). The rule never infers a revert from an element that is merely
//! older (a stale XML keeps protecting the newer local state); R is the
//! admin's explicit choice, so the `refuse` policy does not stop it.

use crate::state::{DomainUuid, Sha256Sum};

/// What to do when the metadata and an unsynced local state disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ConflictPolicy {
    /// The metadata wins; the local state is kept as a backup.
    #[default]
    Metadata,
    /// Refuse to start; an admin decides.
    Refuse,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecisionInput<'a> {
    pub(crate) domain_uuid: &'a DomainUuid,
    /// `(uuid in the element, digest)` of a valid metadata state.
    pub(crate) metadata: Option<(&'a DomainUuid, Sha256Sum)>,
    pub(crate) journal: Option<Sha256Sum>,
    pub(crate) live: Option<Sha256Sum>,
    pub(crate) kept: Option<Sha256Sum>,
    /// A `migrate begin` or `restore begin` for this UUID came just before.
    pub(crate) incoming: bool,
    /// R: a snapshot revert to exactly this element was recorded.
    pub(crate) revert: bool,
    pub(crate) policy: ConflictPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Leave the state dir as it is.
    Nothing(Why),
    /// The live dir is gone; put back the copy kept at the last stop.
    RestoreKept(Why),
    /// Write the metadata state; back up the local state first if there is one.
    RestoreMetadata {
        backup_local: bool,
        why: Why,
    },
    Refuse(Refusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    Incoming,
    NoMetadata,
    AlreadyCurrent,
    LocalNewer,
    NoLocalState,
    MetadataNewer,
    ConflictMetadataWins,
    SnapshotRevert,
}

impl Why {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Why::Incoming => "incoming migration or restore: the state travels with the VM",
            Why::NoMetadata => "no state in the metadata",
            Why::AlreadyCurrent => "the local state matches the metadata",
            Why::LocalNewer => "the local state is newer than the metadata (changed since the last store)",
            Why::NoLocalState => "no local state: restoring the metadata state",
            Why::MetadataNewer => "the metadata holds a newer state",
            Why::SnapshotRevert => {
                "the domain was reverted to a snapshot: its element wins, the local state is backed up"
            }
            Why::ConflictMetadataWins => {
                "local state and metadata differ and the local state was never stored: the metadata wins, the local state is backed up"
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The element belongs to another domain (a cloned XML).
    Clone { element_uuid: DomainUuid },
    /// Both changed, and policy says refuse.
    Conflict {
        metadata: Sha256Sum,
        local: Sha256Sum,
    },
}

pub(crate) fn decide(i: &DecisionInput<'_>) -> Decision {
    if i.incoming {
        return Decision::Nothing(Why::Incoming);
    }
    let Some((element_uuid, m)) = i.metadata else {
        return Decision::Nothing(Why::NoMetadata);
    };
    if element_uuid != i.domain_uuid {
        return Decision::Refuse(Refusal::Clone {
            element_uuid: element_uuid.clone(),
        });
    }
    let local = i.live.or(i.kept);
    let put_back = |why| {
        if i.live.is_some() {
            Decision::Nothing(why)
        } else {
            Decision::RestoreKept(why)
        }
    };
    match local {
        Some(l) if l != m && i.revert => Decision::RestoreMetadata {
            backup_local: true,
            why: Why::SnapshotRevert,
        },
        None => Decision::RestoreMetadata {
            backup_local: false,
            why: Why::NoLocalState,
        },
        Some(l) if l == m => put_back(Why::AlreadyCurrent),
        Some(l) if i.journal == Some(m) && l != m => put_back(Why::LocalNewer),
        Some(l) => {
            let local_unsynced = i.journal != Some(l);
            if local_unsynced && i.policy == ConflictPolicy::Refuse {
                return Decision::Refuse(Refusal::Conflict {
                    metadata: m,
                    local: l,
                });
            }
            Decision::RestoreMetadata {
                backup_local: true,
                why: if local_unsynced {
                    Why::ConflictMetadataWins
                } else {
                    Why::MetadataNewer
                },
            }
        }
    }
}

/// The pending-store rule (issue 22): a post-stop store that did not
/// finish is completed later, by whoever runs next with libvirt reachable.
/// It is the only automatic path that writes a stopped domain (the watch
/// daemon writes running domains only), and it writes only when the kept
/// final state P is still the newest for the domain:
///
/// | case                                         | action                     |
/// |----------------------------------------------|----------------------------|
/// | domain gone, running again, transient, no TPM| drop the record            |
/// | local state (live dir or kept copy) != P     | drop: changed since the stop|
/// | M == P                                       | already stored: record J   |
/// | no M, or M == J                              | store P over M             |
/// | M unreadable, or M != J (someone moved it)   | drop: never write over it  |
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PendingInput {
    /// The final state the stop recorded (P).
    pub(crate) pending: Sha256Sum,
    /// How the domain stands now; `None` when libvirt no longer knows it.
    pub(crate) domain: Option<PendingDomain>,
    /// The local state now (live dir, else the kept copy).
    pub(crate) local: Option<Sha256Sum>,
    /// The config element's digest (`Err(())`: present but unreadable).
    pub(crate) metadata: Option<Result<Sha256Sum, ()>>,
    /// J: the digest this host last synced with the metadata.
    pub(crate) journal: Option<Sha256Sum>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PendingDomain {
    pub(crate) active: bool,
    pub(crate) persistent: bool,
    /// It still carries state (an emulated TPM, or a VARS file we carry).
    pub(crate) carried: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PendingAction {
    Store,
    AlreadyStored,
    Drop(PendingDrop),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PendingDrop {
    Gone,
    Running,
    Transient,
    NotCarried,
    LocalChanged,
    MetadataUnreadable,
    MetadataMoved,
}

impl PendingDrop {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            PendingDrop::Gone => "libvirt no longer knows the domain; its final state stays in the kept copy",
            PendingDrop::Running => "the domain runs again: its live state supersedes the stop's, and the running domain's stores take it from here",
            PendingDrop::Transient => "the domain is transient: no definition is left to store into (the kept copy stays)",
            PendingDrop::NotCarried => "the domain no longer has state this host carries",
            PendingDrop::LocalChanged => "the local state changed since the stop; whoever changed it owns the next store",
            PendingDrop::MetadataUnreadable => "its metadata element does not read; not overwritten (`virt-tpm-state store` replaces it on purpose); the kept copy stays",
            PendingDrop::MetadataMoved => "its metadata changed since this host last synced (a newer state from elsewhere); not overwritten, the next start decides and backs up the local state",
        }
    }
}

pub(crate) fn pending_decision(i: &PendingInput) -> PendingAction {
    let Some(d) = i.domain else {
        return PendingAction::Drop(PendingDrop::Gone);
    };
    if d.active {
        return PendingAction::Drop(PendingDrop::Running);
    }
    if !d.persistent {
        return PendingAction::Drop(PendingDrop::Transient);
    }
    if !d.carried {
        return PendingAction::Drop(PendingDrop::NotCarried);
    }
    if i.local != Some(i.pending) {
        return PendingAction::Drop(PendingDrop::LocalChanged);
    }
    match i.metadata {
        Some(Ok(m)) if m == i.pending => PendingAction::AlreadyStored,
        None => PendingAction::Store,
        Some(Ok(m)) if i.journal == Some(m) => PendingAction::Store,
        Some(Ok(_)) => PendingAction::Drop(PendingDrop::MetadataMoved),
        Some(Err(())) => PendingAction::Drop(PendingDrop::MetadataUnreadable),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(tag: &str) -> Sha256Sum {
        Sha256Sum::of(tag.as_bytes())
    }

    fn uuid(s: &str) -> DomainUuid {
        DomainUuid::parse(s).unwrap()
    }

    struct Row {
        name: &'static str,
        m: Option<&'static str>,
        j: Option<&'static str>,
        live: Option<&'static str>,
        kept: Option<&'static str>,
        incoming: bool,
        revert: bool,
        policy: ConflictPolicy,
        expect: Decision,
    }

    const A: &str = "6b3c2a4e-1d2f-4a5b-8c7d-9e0f1a2b3c4d";
    const B: &str = "00000000-1111-2222-3333-444444444444";

    fn row(name: &'static str) -> Row {
        Row {
            name,
            m: None,
            j: None,
            live: None,
            kept: None,
            incoming: false,
            revert: false,
            policy: ConflictPolicy::Metadata,
            expect: Decision::Nothing(Why::NoMetadata),
        }
    }

    fn run(r: &Row) -> Decision {
        let dom = uuid(A);
        let m = r.m.map(d);
        decide(&DecisionInput {
            domain_uuid: &dom,
            metadata: m.map(|m| (&dom, m)),
            journal: r.j.map(d),
            live: r.live.map(d),
            kept: r.kept.map(d),
            incoming: r.incoming,
            revert: r.revert,
            policy: r.policy,
        })
    }

    #[test]
    fn every_row_of_the_rule() {
        let rows = vec![
            Row {
                ..row("no metadata, nothing local")
            },
            Row {
                live: Some("x"),
                ..row("no metadata, local state untouched")
            },
            Row {
                m: Some("m"),
                live: Some("l"),
                incoming: true,
                expect: Decision::Nothing(Why::Incoming),
                ..row("incoming migration never restores")
            },
            Row {
                m: Some("m"),
                live: Some("m"),
                expect: Decision::Nothing(Why::AlreadyCurrent),
                ..row("M == L (live)")
            },
            Row {
                m: Some("m"),
                kept: Some("m"),
                expect: Decision::RestoreKept(Why::AlreadyCurrent),
                ..row("M == L (kept copy, live dir deleted)")
            },
            Row {
                m: Some("m"),
                j: Some("m"),
                live: Some("l"),
                expect: Decision::Nothing(Why::LocalNewer),
                ..row("M == J, L != J: keep newer live state")
            },
            Row {
                m: Some("m"),
                j: Some("m"),
                kept: Some("l"),
                expect: Decision::RestoreKept(Why::LocalNewer),
                ..row("M == J, L != J, dir deleted: put the kept copy back")
            },
            Row {
                m: Some("m"),
                expect: Decision::RestoreMetadata {
                    backup_local: false,
                    why: Why::NoLocalState,
                },
                ..row("no local state: M restored")
            },
            Row {
                m: Some("m"),
                j: Some("l"),
                live: Some("l"),
                expect: Decision::RestoreMetadata {
                    backup_local: true,
                    why: Why::MetadataNewer,
                },
                ..row("M moved on elsewhere, L == J: M wins")
            },
            Row {
                m: Some("m"),
                j: Some("l"),
                live: Some("l"),
                policy: ConflictPolicy::Refuse,
                expect: Decision::RestoreMetadata {
                    backup_local: true,
                    why: Why::MetadataNewer,
                },
                ..row("M newer is no conflict even under refuse")
            },
            Row {
                m: Some("m"),
                j: Some("old"),
                live: Some("l"),
                expect: Decision::RestoreMetadata {
                    backup_local: true,
                    why: Why::ConflictMetadataWins,
                },
                ..row("both moved: M wins, L backed up")
            },
            Row {
                m: Some("m"),
                live: Some("l"),
                expect: Decision::RestoreMetadata {
                    backup_local: true,
                    why: Why::ConflictMetadataWins,
                },
                ..row("never synced, L differs: M wins, L backed up")
            },
            Row {
                m: Some("m"),
                j: Some("old"),
                live: Some("l"),
                policy: ConflictPolicy::Refuse,
                expect: Decision::Refuse(Refusal::Conflict {
                    metadata: d("m"),
                    local: d("l"),
                }),
                ..row("both moved under refuse policy")
            },
            Row {
                m: Some("m"),
                j: Some("m"),
                live: Some("l"),
                kept: Some("m"),
                expect: Decision::Nothing(Why::LocalNewer),
                ..row("live takes precedence over the kept copy")
            },
            Row {
                m: Some("m"),
                j: Some("m"),
                live: Some("l"),
                revert: true,
                expect: Decision::RestoreMetadata {
                    backup_local: true,
                    why: Why::SnapshotRevert,
                },
                ..row("revert over a newer, stored-elsewhere local state: M, L backed up")
            },
            Row {
                m: Some("m"),
                j: Some("old"),
                live: Some("l"),
                revert: true,
                policy: ConflictPolicy::Refuse,
                expect: Decision::RestoreMetadata {
                    backup_local: true,
                    why: Why::SnapshotRevert,
                },
                ..row("revert over a never-stored local state, even under refuse")
            },
            Row {
                m: Some("m"),
                j: Some("m"),
                kept: Some("l"),
                revert: true,
                expect: Decision::RestoreMetadata {
                    backup_local: true,
                    why: Why::SnapshotRevert,
                },
                ..row("revert with only a kept copy: M, the copy backed up")
            },
            Row {
                m: Some("m"),
                live: Some("m"),
                revert: true,
                expect: Decision::Nothing(Why::AlreadyCurrent),
                ..row("revert to what is already live: nothing")
            },
            Row {
                m: Some("m"),
                revert: true,
                expect: Decision::RestoreMetadata {
                    backup_local: false,
                    why: Why::NoLocalState,
                },
                ..row("revert with no local state")
            },
            Row {
                m: Some("m"),
                live: Some("l"),
                incoming: true,
                revert: true,
                expect: Decision::Nothing(Why::Incoming),
                ..row("incoming wins over a revert (the state travels with the VM)")
            },
        ];
        for r in &rows {
            assert_eq!(run(r), r.expect, "row: {}", r.name);
        }
    }

    #[test]
    fn clone_is_refused_before_anything_else_local() {
        let dom = uuid(A);
        let other = uuid(B);
        let got = decide(&DecisionInput {
            domain_uuid: &dom,
            metadata: Some((&other, d("m"))),
            journal: None,
            live: Some(d("m")),
            kept: None,
            incoming: false,
            revert: true,
            policy: ConflictPolicy::Metadata,
        });
        assert_eq!(
            got,
            Decision::Refuse(Refusal::Clone {
                element_uuid: other
            })
        );
    }

    /// Every row of the pending-store table, and that no input ever stores
    /// over a metadata state other than J or nothing.
    #[test]
    fn pending_rule_table() {
        let (p, j, other) = (d("P"), d("J"), d("X"));
        let stopped = Some(PendingDomain {
            active: false,
            persistent: true,
            carried: true,
        });
        let base = PendingInput {
            pending: p,
            domain: stopped,
            local: Some(p),
            metadata: Some(Ok(j)),
            journal: Some(j),
        };
        let with = |f: &dyn Fn(&mut PendingInput)| {
            let mut i = base.clone();
            f(&mut i);
            pending_decision(&i)
        };
        use PendingAction::*;
        use PendingDrop::*;
        assert_eq!(pending_decision(&base), Store);
        assert_eq!(with(&|i| i.metadata = None), Store);
        assert_eq!(with(&|i| i.metadata = Some(Ok(p))), AlreadyStored);
        assert_eq!(with(&|i| i.metadata = Some(Ok(other))), Drop(MetadataMoved));
        assert_eq!(with(&|i| i.journal = None), Drop(MetadataMoved));
        assert_eq!(
            with(&|i| i.metadata = Some(Err(()))),
            Drop(MetadataUnreadable)
        );
        assert_eq!(with(&|i| i.local = Some(other)), Drop(LocalChanged));
        assert_eq!(with(&|i| i.local = None), Drop(LocalChanged));
        assert_eq!(with(&|i| i.domain = None), Drop(Gone));
        for (f, why) in [
            (
                PendingDomain {
                    active: true,
                    persistent: true,
                    carried: true,
                },
                Running,
            ),
            (
                PendingDomain {
                    active: false,
                    persistent: false,
                    carried: true,
                },
                Transient,
            ),
            (
                PendingDomain {
                    active: false,
                    persistent: true,
                    carried: false,
                },
                NotCarried,
            ),
        ] {
            assert_eq!(with(&|i| i.domain = Some(f)), Drop(why));
        }
        // Exhaustively over small inputs: Store only over no M or M == J,
        // and only when the local state is still P.
        let ds = [None, Some(p), Some(j), Some(other)];
        for local in ds {
            for journal in ds {
                for m in [
                    None,
                    Some(Err(())),
                    Some(Ok(p)),
                    Some(Ok(j)),
                    Some(Ok(other)),
                ] {
                    let i = PendingInput {
                        pending: p,
                        domain: stopped,
                        local,
                        metadata: m,
                        journal,
                    };
                    if pending_decision(&i) == Store {
                        assert_eq!(local, Some(p), "{i:?}");
                        assert!(
                            m.is_none()
                                || m == Some(Ok(journal.unwrap_or(other))) && journal.is_some(),
                            "{i:?}"
                        );
                        assert_ne!(m, Some(Ok(p)), "stored twice: {i:?}");
                    }
                }
            }
        }
    }
}
