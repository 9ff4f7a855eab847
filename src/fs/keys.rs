//! Host keys: `/etc/virt-tpm-state/keys/<time>-<id>.key`, one line of
//! base64 each, root-only.

use super::dir::FileType;
use super::dir::{Dir, FILE_MODE};
use super::error::{io_err, FsError};
use super::Anchor;
use crate::envelope::{KeyId, Keyring, RejectedKey, SecretKey, KEY_LEN};
use crate::paths::Paths;
use nix::fcntl::AtFlags;
use nix::sys::stat::{fstat, fstatat};
use std::path::PathBuf;
use std::time::SystemTime;

const KEYS_DIR: &str = "keys";

/// `<config>/keys`: root-only host keys, one per file.
pub(crate) fn keys_dir(paths: &Paths) -> PathBuf {
    match paths.keys_override() {
        Some(dir) => dir.to_path_buf(),
        None => paths.config_dir().join(KEYS_DIR),
    }
}

/// Opens the keys dir, refusing one a user other than root (or this
/// process's user) could write: a file dropped there would be a key.
fn open_keys_dir(paths: &Paths) -> Result<Option<Dir>, FsError> {
    if let Some(path) = paths.keys_override() {
        // A dir the user names (`--keys DIR`): opened by the trust rule; it
        // must exist, and only its owner (root or this user) may write it.
        let dir = super::open_user_dir(path, false)?
            .ok_or_else(|| io_err("open the keys dir", path, nix::errno::Errno::ENOENT))?;
        if !dir.writable_only_by_us() {
            return Err(FsError::UnsafeKeysDir {
                path: dir.path().to_path_buf(),
                what: "it is not root's or yours, or is group/other-writable",
            });
        }
        return Ok(Some(dir));
    }
    let Some(config) = Anchor::Config.open(paths)? else {
        return Ok(None);
    };
    let Some(dir) = config.open_subdir(KEYS_DIR)? else {
        return Ok(None);
    };
    check_keys_dir(&dir)?;
    Ok(Some(dir))
}

fn check_keys_dir(dir: &Dir) -> Result<(), FsError> {
    if !dir.trusted() || !dir.writable_only_by_us() {
        return Err(FsError::UnsafeKeysDir {
            path: dir.path().to_path_buf(),
            what: "it, or a directory above it, is not root's or is group/other-writable",
        });
    }
    Ok(())
}

/// Loads every `*.key` in the keys dir, oldest first (file names start with
/// their creation time, so the newest sorts last). A key file that is a
/// link, not regular, not root's, readable by group or others, or
/// malformed is skipped with a log line naming it (never its content), and
/// listed in the keyring: only an element sealed with that key fails, and
/// its error names the file. A keys dir others can write fails every call.
pub(crate) fn load_keyring(paths: &Paths) -> Result<Keyring, FsError> {
    let Some(dir) = open_keys_dir(paths)? else {
        let mut ring = Keyring::default();
        add_host_identity(paths, &mut ring)?;
        add_identity_file(paths, &mut ring);
        return Ok(ring);
    };
    let mut names: Vec<String> = dir
        .list()?
        .into_iter()
        .filter(|n| n.ends_with(".key") && !n.starts_with('.'))
        .collect();
    names.sort();
    let mut keys = Vec::new();
    let mut rejected = Vec::new();
    for name in names {
        match load_key(&dir, &name) {
            Ok(key) => keys.push(key),
            Err(why) => {
                // Syslog only (in the hook): the refusal of an element that
                // needs this key names the file itself, in one line.
                log::info!(
                    "key file {} skipped: {why}",
                    dir.path().join(&name).display()
                );
                rejected.push(RejectedKey {
                    id: key_id_of_file(&name),
                    file: dir.path().join(&name).display().to_string(),
                    why,
                });
            }
        }
    }
    let mut ring = Keyring::with_rejected(keys, rejected);
    add_host_identity(paths, &mut ring)?;
    add_identity_file(paths, &mut ring);
    Ok(ring)
}

/// `<time>-<id>.key` -> id.
fn key_id_of_file(name: &str) -> Option<KeyId> {
    let stem = name.strip_suffix(".key")?;
    KeyId::parse(stem.rsplit('-').next()?)
}

/// Reads a secret file (a key or an identity): a regular file, root's (or
/// this process user's), no access for group or others, at most `max` bytes.
fn read_secret_file(dir: &Dir, name: &str, max: u64) -> Result<Vec<u8>, &'static str> {
    let st = fstatat(dir.fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW)
        .map_err(|_| "it cannot be examined")?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err("it is a symlink or not a regular file");
    }
    let me = nix::unistd::geteuid().as_raw();
    if st.st_uid != 0 && st.st_uid != me {
        return Err("it is owned by another user (chown root it)");
    }
    if st.st_mode & 0o077 != 0 {
        return Err("it is readable or writable by group or others (chmod 600 it)");
    }
    Ok(dir
        .read_file(name, max)
        .map_err(|_| "it cannot be read (a hard link, or too large)")?
        .unwrap_or_default())
}

fn load_key(dir: &Dir, name: &str) -> Result<SecretKey, &'static str> {
    let mut text = read_secret_file(dir, name, 256)?;
    let key = parse_key_file(&text)
        .ok_or("it is not a virt-tpm-state key (one line of base64, 32 bytes)");
    zeroize::Zeroize::zeroize(&mut text);
    key
}

/// This host's age identity file: `<config>/host-identity.txt`.
pub(crate) const HOST_IDENTITY_FILE: &str = "host-identity.txt";
/// The default recipient set: `<config>/recipients.d/*.txt`.
pub(crate) const RECIPIENTS_DIR: &str = "recipients.d";
/// A domain's own recipient set, replacing the default:
/// `<config>/recipients.d/domains/<uuid>.txt`.
pub(crate) const DOMAIN_RECIPIENTS_DIR: &str = "domains";

pub(crate) fn host_identity_path(paths: &Paths) -> PathBuf {
    paths.config_dir().join(HOST_IDENTITY_FILE)
}

pub(crate) fn recipients_dir(paths: &Paths) -> PathBuf {
    paths.config_dir().join(RECIPIENTS_DIR)
}

/// Opens the config dir for secrets, refusing one others could write.
fn open_config_for_secrets(paths: &Paths) -> Result<Option<Dir>, FsError> {
    let Some(config) = Anchor::Config.open(paths)? else {
        return Ok(None);
    };
    check_keys_dir(&config)?;
    Ok(Some(config))
}

/// Adds this host's age identity to `ring`, if the host has one. An
/// unusable identity file (mode, owner, content, a missing plugin) is
/// recorded in the keyring, so only elements that need it fail, naming it.
fn add_host_identity(paths: &Paths, ring: &mut Keyring) -> Result<(), FsError> {
    let Some(config) = Anchor::Config.open(paths)? else {
        return Ok(());
    };
    if let Err(e) = check_keys_dir(&config) {
        // Only elements sealed for recipients need the identity: they fail,
        // naming this; elements under host keys still open.
        ring.set_identity_problem(format!("identity cannot be used: {e}"));
        return Ok(());
    }
    if !config.check_file(HOST_IDENTITY_FILE).unwrap_or(true) {
        return Ok(());
    }
    let origin = config.path().join(HOST_IDENTITY_FILE).display().to_string();
    let loaded = read_secret_file(&config, HOST_IDENTITY_FILE, 64 * 1024)
        .map_err(|why| format!("identity file {origin} cannot be used: {why}"))
        .and_then(|mut raw| {
            let parsed = std::str::from_utf8(&raw)
                .map_err(|_| format!("identity file {origin} is not text"))
                .and_then(|t| crate::recipients::parse_identities(t, &origin));
            zeroize::Zeroize::zeroize(&mut raw);
            parsed
        });
    match loaded {
        Ok(ids) => ring.add_identities(ids),
        Err(why) => {
            log::info!("{why}");
            ring.set_identity_problem(why);
        }
    }
    Ok(())
}

/// Adds the identities of `--identity FILE`; a file that cannot be used is
/// recorded (an element that needs it then fails naming it).
fn add_identity_file(paths: &Paths, ring: &mut Keyring) {
    if let Some(path) = paths.identity_file() {
        match load_identity_file(path) {
            Ok(ids) => ring.add_identities(ids),
            Err(why) => ring.set_identity_problem(why),
        }
    }
}

/// Reads identities from a file the user names (`--identity FILE`), by the
/// trust rule; the same checks as the host's identity file.
pub(crate) fn load_identity_file(
    path: &std::path::Path,
) -> Result<Vec<crate::recipients::HostIdentity>, String> {
    let shown = path.display().to_string();
    let (Some(parent), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str()))
    else {
        return Err(format!("{shown}: not a file path"));
    };
    let parent = if parent.as_os_str().is_empty() {
        std::path::Path::new(".")
    } else {
        parent
    };
    let dir = super::open_user_dir(parent, false)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{shown}: its directory does not exist"))?;
    let mut raw = read_secret_file(&dir, name, 64 * 1024)
        .map_err(|why| format!("identity file {shown} cannot be used: {why}"))?;
    let parsed = std::str::from_utf8(&raw)
        .map_err(|_| format!("identity file {shown} is not text"))
        .and_then(|t| crate::recipients::parse_identities(t, &shown));
    zeroize::Zeroize::zeroize(&mut raw);
    parsed
}

/// Creates this host's identity file (0600, `O_EXCL`: never overwrites).
/// `Ok(None)` when one exists already.
pub(crate) fn create_host_identity(paths: &Paths, text: &str) -> Result<Option<PathBuf>, FsError> {
    let config = Anchor::Config.open_or_create(paths, 0o755)?;
    check_keys_dir(&config)?;
    if config.check_file(HOST_IDENTITY_FILE)? {
        return Ok(None);
    }
    config.create_new_file(HOST_IDENTITY_FILE, text.as_bytes(), FILE_MODE)?;
    Ok(Some(config.path().join(HOST_IDENTITY_FILE)))
}

/// This host's identity, alone (for `host-id`): `Ok(None)` when none.
pub(crate) fn load_host_identity(
    paths: &Paths,
) -> Result<Option<Result<Vec<crate::recipients::HostIdentity>, String>>, FsError> {
    let mut ring = Keyring::default();
    add_host_identity(paths, &mut ring)?;
    Ok(match ring.identity_problem() {
        Some(why) => Some(Err(why.to_string())),
        None if ring.identities().is_empty() => None,
        None => Some(Ok(ring.identities().to_vec())),
    })
}

/// The recipient set for domain `uuid`: its own file
/// (`recipients.d/domains/<uuid>.txt`) when it exists, else every
/// `recipients.d/*.txt` together. `None` when the set is empty: the domain
/// is then sealed with a host key, as before recipients existed.
pub(crate) fn load_recipients(
    paths: &Paths,
    uuid: &str,
) -> Result<Option<crate::recipients::RecipientSet>, FsError> {
    use crate::recipients::{parse_recipients, RecipientSet};
    let Some(config) = open_config_for_secrets(paths)? else {
        return Ok(None);
    };
    let Some(dir) = config.open_subdir(RECIPIENTS_DIR)? else {
        return Ok(None);
    };
    check_keys_dir(&dir)?;
    let read = |d: &Dir, name: &str| -> Result<Vec<crate::recipients::Recipient>, FsError> {
        let origin = d.path().join(name).display().to_string();
        let raw = d.read_file(name, 1024 * 1024)?.unwrap_or_default();
        let text = String::from_utf8(raw).map_err(|_| {
            FsError::from(crate::recipients::RecipientsError {
                origin: origin.clone(),
                line: 0,
                why: "not UTF-8 text".into(),
            })
        })?;
        Ok(parse_recipients(&text, &origin)?)
    };
    if let Some(domains) = dir.open_subdir(DOMAIN_RECIPIENTS_DIR)? {
        let own = format!("{uuid}.txt");
        if domains.check_file(&own)? {
            let set = RecipientSet::new(
                read(&domains, &own)?,
                domains.path().join(&own).display().to_string(),
            );
            return Ok((!set.is_empty()).then_some(set));
        }
    }
    let mut names: Vec<String> = dir
        .list()?
        .into_iter()
        .filter(|n| n.ends_with(".txt") && !n.starts_with('.'))
        .collect();
    names.sort();
    let mut all = Vec::new();
    for name in names {
        all.extend(read(&dir, &name)?);
    }
    let set = RecipientSet::new(all, dir.path().display().to_string());
    Ok((!set.is_empty()).then_some(set))
}

fn parse_key_file(text: &[u8]) -> Option<SecretKey> {
    use base64::Engine as _;
    let mut raw = base64::engine::general_purpose::STANDARD
        .decode(std::str::from_utf8(text).ok()?.trim())
        .ok()?;
    let key = <[u8; KEY_LEN]>::try_from(raw.as_slice())
        .ok()
        .map(SecretKey::from_bytes);
    zeroize::Zeroize::zeroize(&mut raw);
    key
}

/// Creates a new host key file (0600, `O_EXCL`: never overwrites) and
/// returns its id and path. The keys dir is created 0700 when missing.
pub(crate) fn create_key(paths: &Paths, key: &SecretKey) -> Result<(KeyId, PathBuf), FsError> {
    use base64::Engine as _;
    let config = Anchor::Config.open_or_create(paths, 0o755)?;
    let dir = config.ensure_subdir(KEYS_DIR, 0o700)?;
    check_keys_dir(&dir)?;
    let st = fstat(dir.fd()).map_err(|e| io_err("stat", dir.path(), e))?;
    if st.st_mode & 0o077 != 0 {
        log::warn!(
            "{} is readable by group or others: chmod 700 it",
            dir.path().display()
        );
    }
    let id = key.id();
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .replace([':', '-'], "");
    let name = format!("{stamp}-{id}.key");
    let mut text = base64::engine::general_purpose::STANDARD.encode(key.expose());
    text.push('\n');
    let result = dir.create_new_file(&name, text.as_bytes(), FILE_MODE);
    zeroize::Zeroize::zeroize(&mut text);
    result?;
    Ok((id, dir.path().join(name)))
}
