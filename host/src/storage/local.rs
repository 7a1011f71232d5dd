//! The embedded image store: PNGs under a folder, download URLs signed with HMAC-SHA256 and
//! served (after [`LocalStore::verify`]) by the local API.
//!
//! Layout: `{root}/{user_id}/{job_id}/{n}.png`. Every write goes to a temporary file in the
//! same folder and is published with a hard link, which fails when the target exists, so a
//! reader never sees half a PNG and a retried job never overwrites an image (the same
//! create-only contract as Supabase's `x-upsert: false`).
//!
//! A URL is `{public_base_url}/files/{user}/{job}/{n}.png?expires={unix_secs}&sig={hex}` where
//! `sig = HMAC-SHA256(key, "{user}/{job}/{n}.png\n{expires}")`. Anyone holding the URL can
//! download the image until `expires`; nobody can make one without the key.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{ImageStore, ObjectKey, SignedUrl, StorageError, UploadOutcome};

type HmacSha256 = Hmac<Sha256>;

/// Length of a generated signing key, in bytes (the HMAC-SHA256 block-size sweet spot).
pub const GENERATED_KEY_BYTES: usize = 32;

/// Shortest signing key accepted, in bytes: anything shorter is guessable.
pub const MIN_KEY_BYTES: usize = 16;

/// Longest id accepted by [`LocalStore::verify`]. Signing already bounds ids through
/// [`ObjectKey`]; this is only the file-name limit, because the verifier does not know the
/// configured `max_user_id_chars` and must not refuse a URL it signed itself.
const VERIFY_MAX_ID_CHARS: usize = 255;

/// Makes temporary file names unique within the process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Why a local image URL was refused. The local API maps these to HTTP answers with
/// [`UrlError::http_status`]; none of them reveals whether another image exists.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// The signature is valid but its `expires` has passed.
    #[error("the link has expired")]
    Expired,
    /// The signature does not match the path and expiry (tampered, truncated or made with
    /// another key).
    #[error("the link signature is not valid")]
    BadSignature,
    /// The path is not `user/job/n.png` with safe ids (traversal attempts land here).
    #[error("not an image path")]
    BadPath,
    /// The link is genuine but the file is gone.
    #[error("image not found")]
    NotFound,
}

impl UrlError {
    /// The HTTP status the file route should answer with: 400 for a malformed path, 403 for a
    /// bad or expired signature, 404 for a missing file.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::BadPath => 400,
            Self::Expired | Self::BadSignature => 403,
            Self::NotFound => 404,
        }
    }
}

/// Images on the local filesystem, URLs signed with a secret key.
pub struct LocalStore {
    root: PathBuf,
    public_base_url: String,
    /// HMAC state keyed once; cloned per signature.
    mac: HmacSha256,
}

impl std::fmt::Debug for LocalStore {
    // By hand so the signing key never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalStore")
            .field("root", &self.root)
            .field("public_base_url", &self.public_base_url)
            .finish_non_exhaustive()
    }
}

impl LocalStore {
    /// Opens the store as `[storage.local]` sets it: URLs on its `public_base_url`, else on
    /// `default_base_url` (the local API's own address); `signing_key` as for [`LocalStore::new`].
    pub fn from_config(
        config: &crate::config::LocalStorageConfig,
        root: PathBuf,
        default_base_url: String,
        signing_key: Vec<u8>,
    ) -> Result<Self, StorageError> {
        let base = if config.public_base_url.is_empty() {
            default_base_url
        } else {
            config.public_base_url.clone()
        };
        Self::new(root, base, signing_key)
    }

    /// Opens (creating it if needed) the image folder `root`. `public_base_url` is what
    /// clients use to reach the local API (`http://host:port`, a trailing `/` is dropped);
    /// `signing_key` comes from [`LocalStore::load_or_create_key`] so URLs survive restarts.
    pub fn new(
        root: PathBuf,
        public_base_url: String,
        signing_key: Vec<u8>,
    ) -> Result<Self, StorageError> {
        if signing_key.len() < MIN_KEY_BYTES {
            return Err(StorageError::Config(format!(
                "storage.local.signing_key must be at least {MIN_KEY_BYTES} bytes (got {})",
                signing_key.len()
            )));
        }
        let base = public_base_url.trim().trim_end_matches('/').to_string();
        let rest = base
            .strip_prefix("http://")
            .or_else(|| base.strip_prefix("https://"));
        match rest {
            Some(host) if !host.is_empty() && !base.contains(['?', '#', ' ']) => {}
            _ => {
                return Err(StorageError::Config(format!(
                    "storage.local.public_base_url must be an http:// or https:// URL without query, got {public_base_url:?}"
                )));
            }
        }
        let mac = HmacSha256::new_from_slice(&signing_key)
            .map_err(|e| StorageError::Config(format!("storage.local.signing_key: {e}")))?;
        fs::create_dir_all(&root).map_err(|e| {
            StorageError::Io(format!("creating image folder {}: {e}", root.display()))
        })?;
        Ok(Self {
            root,
            public_base_url: base,
            mac,
        })
    }

    /// Returns the signing key: `configured` when set (its UTF-8 bytes), else the key kept in
    /// `key_file`, else a new random key written there (mode 0600, published atomically and
    /// create-only, so two workers starting together end up sharing one key). Keeping the key on
    /// disk is what lets URLs handed out before a restart keep working after it.
    pub fn load_or_create_key(configured: &str, key_file: &Path) -> Result<Vec<u8>, StorageError> {
        if !configured.is_empty() {
            if configured.len() < MIN_KEY_BYTES {
                return Err(StorageError::Config(format!(
                    "storage.local.signing_key must be at least {MIN_KEY_BYTES} bytes (got {})",
                    configured.len()
                )));
            }
            return Ok(configured.as_bytes().to_vec());
        }
        match read_key_file(key_file) {
            Ok(key) => return Ok(key),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(StorageError::Io(format!(
                    "reading signing key {}: {e}",
                    key_file.display()
                )));
            }
        }
        let mut key = vec![0u8; GENERATED_KEY_BYTES];
        File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut key))
            .map_err(|e| {
                StorageError::Io(format!("reading /dev/urandom for a signing key: {e}"))
            })?;
        if let Some(dir) = key_file.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)
                .map_err(|e| StorageError::Io(format!("creating {}: {e}", dir.display())))?;
        }
        match write_create_only(key_file, &key)? {
            UploadOutcome::Created => {
                tracing::info!(path = %key_file.display(), "generated a new URL signing key");
                Ok(key)
            }
            // Another process won the race: use its key, so both sign alike.
            UploadOutcome::AlreadyExisted => read_key_file(key_file).map_err(|e| {
                StorageError::Io(format!("reading signing key {}: {e}", key_file.display()))
            }),
        }
    }

    /// The image folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The URL base clients are given, without a trailing `/`.
    pub fn public_base_url(&self) -> &str {
        &self.public_base_url
    }

    /// Where a key's file lives.
    pub fn file_path(&self, key: &ObjectKey) -> PathBuf {
        self.root
            .join(key.user_id())
            .join(key.job_id())
            .join(format!("{}.png", key.index()))
    }

    /// The signed URL for `key`, valid through the second `expires` (Unix seconds).
    /// Split out from [`ImageStore::sign`] so tests and the file route can use a fixed clock.
    pub fn signed_url(&self, key: &ObjectKey, expires: u64) -> String {
        let path = key.path();
        let sig = to_hex(&self.mac(&path, expires).finalize().into_bytes());
        format!(
            "{}/files/{path}?expires={expires}&sig={sig}",
            self.public_base_url
        )
    }

    /// Checks a download request for `/files/{path}?expires=..&sig=..` at time `now_secs` and
    /// returns the file to serve. Order: path shape (cheap, and refuses traversal before
    /// anything touches the disk), signature in constant time, then expiry, so `Expired` is
    /// only ever said of a genuine link, then the file's existence.
    pub fn verify(
        &self,
        path: &str,
        expires: u64,
        sig: &str,
        now_secs: u64,
    ) -> Result<PathBuf, UrlError> {
        let key = parse_path(path).ok_or(UrlError::BadPath)?;
        let sig = from_hex(sig).ok_or(UrlError::BadSignature)?;
        self.mac(&key.path(), expires)
            .verify_slice(&sig)
            .map_err(|_| UrlError::BadSignature)?;
        if now_secs > expires {
            return Err(UrlError::Expired);
        }
        let file = self.file_path(&key);
        match fs::metadata(&file) {
            Ok(meta) if meta.is_file() => Ok(file),
            _ => Err(UrlError::NotFound),
        }
    }

    fn mac(&self, path: &str, expires: u64) -> HmacSha256 {
        let mut mac = self.mac.clone();
        mac.update(path.as_bytes());
        mac.update(b"\n");
        mac.update(expires.to_string().as_bytes());
        mac
    }
}

/// Parses `user/job/n.png` back into a key, refusing anything else: more or fewer segments,
/// unsafe ids (so no `..`, `.`, empty segments, backslashes or absolute paths) and
/// non-canonical indexes such as `01.png` or `+1.png`.
fn parse_path(path: &str) -> Option<ObjectKey> {
    let mut parts = path.split('/');
    let (user, job, file) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let index = file.strip_suffix(".png")?;
    let n: u32 = index.parse().ok()?;
    if n.to_string() != index {
        return None;
    }
    ObjectKey::new(user, job, n, VERIFY_MAX_ID_CHARS).ok()
}

impl ImageStore for LocalStore {
    async fn upload(&self, key: &ObjectKey, png: Vec<u8>) -> Result<UploadOutcome, StorageError> {
        let dest = self.file_path(key);
        let path = key.path();
        let outcome = tokio::task::spawn_blocking(move || write_create_only(&dest, &png))
            .await
            .map_err(|e| StorageError::Io(format!("upload task failed: {e}")))??;
        match outcome {
            UploadOutcome::Created => tracing::debug!(key = %path, "stored image"),
            UploadOutcome::AlreadyExisted => {
                tracing::info!(key = %path, "image already stored; kept the existing file")
            }
        }
        Ok(outcome)
    }

    async fn sign(
        &self,
        keys: &[ObjectKey],
        ttl: Duration,
    ) -> Result<Vec<SignedUrl>, StorageError> {
        let expires = now_secs().saturating_add(ttl_secs(ttl));
        // Like Supabase, only existing objects get a URL: a link to nothing is a bug upstream.
        let files: Vec<PathBuf> = keys.iter().map(|k| self.file_path(k)).collect();
        let missing = tokio::task::spawn_blocking(move || files.iter().position(|f| !f.is_file()))
            .await
            .map_err(|e| StorageError::Io(format!("sign task failed: {e}")))?;
        if let Some(i) = missing {
            return Err(StorageError::Client {
                status: 404,
                code: Some("NoSuchKey".into()),
                message: format!("cannot sign {}: no such image", keys[i].path()),
            });
        }
        Ok(keys
            .iter()
            .map(|k| SignedUrl {
                url: self.signed_url(k, expires),
                expires_at_ms: expires.saturating_mul(1000),
            })
            .collect())
    }

    async fn health(&self) -> Result<(), StorageError> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || probe_writable(&root))
            .await
            .map_err(|e| StorageError::Io(format!("health task failed: {e}")))?
    }

    fn name(&self) -> &'static str {
        "local"
    }
}

fn read_key_file(path: &Path) -> io::Result<Vec<u8>> {
    let key = fs::read(path)?;
    if key.len() < MIN_KEY_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the key is {} bytes, fewer than {MIN_KEY_BYTES}; delete the file to generate a new one",
                key.len()
            ),
        ));
    }
    Ok(key)
}

/// Writes `data` to `dest` atomically and only if `dest` does not exist yet. The bytes go to
/// a private temporary file in the same folder, are synced, then published with
/// `hard_link`, which fails with `AlreadyExists` instead of replacing (a plain `rename` would
/// overwrite). Filesystems without hard links fall back to check-then-rename.
fn write_create_only(dest: &Path, data: &[u8]) -> Result<UploadOutcome, StorageError> {
    let io_err =
        |what: &str, e: io::Error| StorageError::Io(format!("{what} {}: {e}", dest.display()));
    remove_stale_temps(dest);
    if fs::symlink_metadata(dest).is_ok() {
        return Ok(UploadOutcome::AlreadyExisted);
    }
    let dir = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| io_err("creating the folder of", e))?;
    let file_name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(
        ".{file_name}.tmp-{}-{}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = write_temp(&tmp, data)
        .map_err(|e| io_err("writing a temporary file for", e))
        .and_then(|()| publish(&tmp, dest).map_err(|e| io_err("publishing", e)));
    // The temporary name is ours alone; after a link (or a failure) it must go.
    let _ = fs::remove_file(&tmp);
    let outcome = result?;
    if outcome == UploadOutcome::Created {
        sync_dir(dir);
    }
    Ok(outcome)
}

/// Removes temporary files a killed process left next to `dest` (`.{name}.tmp-{pid}-{n}` with
/// another pid). Only one worker process uses a data dir at a time (sled holds a lock), so a
/// temp file of another process is debris; this process's own are in use.
fn remove_stale_temps(dest: &Path) {
    let (Some(dir), Some(name)) = (dest.parent(), dest.file_name().and_then(|n| n.to_str())) else {
        return;
    };
    let prefix = format!(".{name}.tmp-");
    let ours = format!("{prefix}{}-", std::process::id());
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(&prefix) && !n.starts_with(&ours))
        {
            let _ = fs::remove_file(entry.path());
        }
    }
}

fn write_temp(tmp: &Path, data: &[u8]) -> io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(tmp)?;
    file.write_all(data)?;
    file.sync_all()
}

fn publish(tmp: &Path, dest: &Path) -> io::Result<UploadOutcome> {
    match fs::hard_link(tmp, dest) {
        Ok(()) => Ok(UploadOutcome::Created),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(UploadOutcome::AlreadyExisted),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::Unsupported | io::ErrorKind::PermissionDenied
            ) =>
        {
            // No hard links here (some FUSE/SMB mounts): the narrow race this leaves is only
            // between two writers of the same key, which write the same deterministic image.
            if fs::symlink_metadata(dest).is_ok() {
                return Ok(UploadOutcome::AlreadyExisted);
            }
            fs::rename(tmp, dest)?;
            Ok(UploadOutcome::Created)
        }
        Err(e) => Err(e),
    }
}

/// Makes the new directory entry durable; best effort (not every platform can open a folder).
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

fn probe_writable(root: &Path) -> Result<(), StorageError> {
    let probe = root.join(format!(
        ".health-{}-{}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = write_temp(&probe, b"ok");
    let _ = fs::remove_file(&probe);
    result.map_err(|e| {
        StorageError::Io(format!(
            "image folder {} is not writable: {e}",
            root.display()
        ))
    })
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whole seconds, rounded up, at least 1: a link is never born expired.
fn ttl_secs(ttl: Duration) -> u64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    secs.max(1)
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 {
        return None;
    }
    let nibble = |c: u8| {
        char::from(c)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    s.as_bytes()
        .chunks_exact(2)
        .map(|pair| Some((nibble(pair[0])? << 4) | nibble(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn store(dir: &Path) -> LocalStore {
        LocalStore::new(
            dir.join("images"),
            "http://127.0.0.1:8000/".into(),
            KEY.to_vec(),
        )
        .unwrap()
    }

    #[test]
    fn urls_use_the_configured_base_else_the_local_apis_address() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::config::LocalStorageConfig {
            public_base_url: String::new(),
            signing_key: String::new(),
        };
        let own = "http://127.0.0.1:8000".to_string();
        let open = |c: &crate::config::LocalStorageConfig| {
            LocalStore::from_config(c, dir.path().join("images"), own.clone(), KEY.to_vec())
                .unwrap()
        };
        assert_eq!(open(&config).public_base_url(), "http://127.0.0.1:8000");
        config.public_base_url = "https://images.example.com/".into();
        assert_eq!(
            open(&config).public_base_url(),
            "https://images.example.com"
        );
    }

    fn key(user: &str, job: &str, n: u32) -> ObjectKey {
        ObjectKey::new(user, job, n, 64).unwrap()
    }

    /// Splits a URL made by `sign` into the verifier's inputs.
    fn parts(url: &str) -> (String, u64, String) {
        let rest = url.strip_prefix("http://127.0.0.1:8000/files/").unwrap();
        let (path, query) = rest.split_once('?').unwrap();
        let (e, s) = query.split_once('&').unwrap();
        (
            path.to_string(),
            e.strip_prefix("expires=").unwrap().parse().unwrap(),
            s.strip_prefix("sig=").unwrap().to_string(),
        )
    }

    #[tokio::test]
    async fn temp_files_left_by_a_killed_writer_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let k = key("user-1", "job_9", 0);
        let folder = dir.path().join("images/user-1/job_9");
        fs::create_dir_all(&folder).unwrap();
        fs::write(folder.join(".0.png.tmp-123-4"), b"half").unwrap();
        s.upload(&k, b"png".to_vec()).await.unwrap();
        let names: Vec<_> = fs::read_dir(&folder)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("0.png")]);
        // Also when the image itself survived the crash.
        fs::write(folder.join(".0.png.tmp-123-5"), b"half").unwrap();
        assert_eq!(
            s.upload(&k, b"png".to_vec()).await.unwrap(),
            UploadOutcome::AlreadyExisted
        );
        assert_eq!(fs::read_dir(&folder).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn upload_sign_verify_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let k = key("user-1", "job_42", 3);
        assert_eq!(
            s.upload(&k, b"png bytes".to_vec()).await.unwrap(),
            UploadOutcome::Created
        );
        let file = dir.path().join("images/user-1/job_42/3.png");
        assert_eq!(fs::read(&file).unwrap(), b"png bytes");
        let leftovers: Vec<_> = fs::read_dir(file.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary files left behind");

        let urls = s
            .sign(std::slice::from_ref(&k), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(urls.len(), 1);
        assert!(
            urls[0]
                .url
                .starts_with("http://127.0.0.1:8000/files/user-1/job_42/3.png?expires="),
            "{}",
            urls[0].url
        );
        let (path, expires, sig) = parts(&urls[0].url);
        assert_eq!(urls[0].expires_at_ms, expires * 1000);
        assert!(expires >= now_secs() + 59 && expires <= now_secs() + 61);
        assert_eq!(sig.len(), 64);
        assert_eq!(s.verify(&path, expires, &sig, now_secs()).unwrap(), file);
        assert_eq!(
            s.verify(&path, expires, &sig, expires).unwrap(),
            file,
            "valid through its last second"
        );
        assert_eq!(s.name(), "local");
    }

    #[tokio::test]
    async fn sign_keeps_order_and_refuses_missing_images() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let keys: Vec<_> = (0..3).map(|n| key("u", "j", n)).collect();
        for k in &keys {
            s.upload(k, vec![1]).await.unwrap();
        }
        let urls = s.sign(&keys, Duration::from_millis(1)).await.unwrap();
        for (n, u) in urls.iter().enumerate() {
            assert!(u.url.contains(&format!("/files/u/j/{n}.png?")), "{}", u.url);
        }
        let err = s
            .sign(&[key("u", "j", 9)], Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StorageError::Client { status: 404, .. }),
            "{err:?}"
        );
        assert!(
            s.sign(&[], Duration::from_secs(1))
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn expired_link_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let k = key("u", "j", 0);
        s.upload(&k, vec![1]).await.unwrap();
        let (path, expires, sig) = parts(&s.signed_url(&k, 1_000));
        assert!(s.verify(&path, expires, &sig, 1_000).is_ok());
        assert_eq!(
            s.verify(&path, expires, &sig, 1_001),
            Err(UrlError::Expired)
        );
        // Extending the expiry breaks the signature rather than reviving the link.
        assert_eq!(
            s.verify(&path, 5_000, &sig, 1_001),
            Err(UrlError::BadSignature)
        );
    }

    #[tokio::test]
    async fn tampered_signature_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let k = key("u", "j", 0);
        s.upload(&k, vec![1]).await.unwrap();
        let (path, expires, sig) = parts(&s.signed_url(&k, 9_999_999_999));
        let mut flipped = sig.clone().into_bytes();
        flipped[10] = if flipped[10] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        let not_hex = format!("g{}", &sig[1..]);
        for bad in [flipped.as_str(), &sig[..62], "", "zz", &not_hex] {
            assert_eq!(
                s.verify(&path, expires, bad, 0),
                Err(UrlError::BadSignature),
                "{bad}"
            );
        }
        // Upper-case hex is the same signature.
        assert!(s.verify(&path, expires, &sig.to_uppercase(), 0).is_ok());
        // Another key's signature does not pass.
        let other = LocalStore::new(
            dir.path().join("images"),
            "http://127.0.0.1:8000".into(),
            vec![7; 32],
        )
        .unwrap();
        let (_, _, other_sig) = parts(&other.signed_url(&k, expires));
        assert_eq!(
            s.verify(&path, expires, &other_sig, 0),
            Err(UrlError::BadSignature)
        );
    }

    #[tokio::test]
    async fn tampered_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        for (user, n) in [("u", 0), ("u", 1), ("v", 0)] {
            s.upload(&key(user, "j", n), vec![1]).await.unwrap();
        }
        let (_, expires, sig) = parts(&s.signed_url(&key("u", "j", 0), 9_999_999_999));
        for other in ["u/j/1.png", "v/j/0.png", "u/k/0.png"] {
            assert_eq!(
                s.verify(other, expires, &sig, 0),
                Err(UrlError::BadSignature),
                "{other}"
            );
        }
        // A genuine link to a file that has since gone.
        let gone = key("u", "j", 7);
        let (path, expires, sig) = parts(&s.signed_url(&gone, 9_999_999_999));
        assert_eq!(s.verify(&path, expires, &sig, 0), Err(UrlError::NotFound));
    }

    #[tokio::test]
    async fn traversal_and_malformed_paths_are_refused_before_the_signature() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        fs::write(dir.path().join("secret.png"), b"x").unwrap();
        for bad in [
            "../secret.png",
            "u/../../secret.png",
            "u/j/../../../secret.png",
            "/etc/passwd",
            "/u/j/0.png",
            "u/j/0.png/",
            "u//0.png",
            "u/j/./0.png",
            ".././0.png",
            "u/../0.png",
            "u\\..\\x/j/0.png",
            "u/j/%2e%2e.png",
            "u/j/0.PNG",
            "u/j/0.png.tmp",
            "u/j/01.png",
            "u/j/+1.png",
            "u/j/-1.png",
            "u/j/4294967296.png",
            "u/j/.png",
            "u/j",
            "",
            "u/j/k/0.png",
            "-u/j/0.png",
            "u/j\0/0.png",
        ] {
            // Even a correct MAC for the string must not help.
            let mut mac = HmacSha256::new_from_slice(KEY).unwrap();
            mac.update(format!("{bad}\n9999999999").as_bytes());
            let sig = to_hex(&mac.finalize().into_bytes());
            assert_eq!(
                s.verify(bad, 9_999_999_999, &sig, 0),
                Err(UrlError::BadPath),
                "{bad:?}"
            );
        }
        assert_eq!(UrlError::BadPath.http_status(), 400);
        assert_eq!(UrlError::BadSignature.http_status(), 403);
        assert_eq!(UrlError::NotFound.http_status(), 404);
    }

    #[tokio::test]
    async fn re_upload_keeps_the_first_image() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let k = key("u", "j", 0);
        assert_eq!(
            s.upload(&k, b"first".to_vec()).await.unwrap(),
            UploadOutcome::Created
        );
        assert_eq!(
            s.upload(&k, b"second".to_vec()).await.unwrap(),
            UploadOutcome::AlreadyExisted
        );
        assert_eq!(fs::read(s.file_path(&k)).unwrap(), b"first");
        let entries: Vec<_> = fs::read_dir(dir.path().join("images/u/j"))
            .unwrap()
            .collect();
        assert_eq!(entries.len(), 1, "no temporary files left behind");
    }

    #[tokio::test]
    async fn concurrent_uploads_of_one_key_create_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(store(dir.path()));
        let k = key("u", "j", 0);
        let tasks: Vec<_> = (0..8u8)
            .map(|i| {
                let (s, k) = (s.clone(), k.clone());
                tokio::spawn(async move { s.upload(&k, vec![i; 1000]).await.unwrap() })
            })
            .collect();
        let mut created = 0;
        for t in tasks {
            if t.await.unwrap() == UploadOutcome::Created {
                created += 1;
            }
        }
        assert_eq!(created, 1);
        let data = fs::read(s.file_path(&k)).unwrap();
        assert_eq!(data.len(), 1000);
        assert!(
            data.iter().all(|&b| b == data[0]),
            "one writer's bytes, whole"
        );
    }

    #[test]
    fn key_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub/signing.key");
        let first = LocalStore::load_or_create_key("", &file).unwrap();
        assert_eq!(first.len(), GENERATED_KEY_BYTES);
        assert_eq!(fs::read(&file).unwrap(), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                fs::metadata(&file).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        assert_eq!(
            LocalStore::load_or_create_key("", &file).unwrap(),
            first,
            "reused after a restart"
        );
        let other = LocalStore::load_or_create_key("", &dir.path().join("other.key")).unwrap();
        assert_ne!(other, first, "random per file");
        assert_eq!(
            fs::read_dir(dir.path().join("sub")).unwrap().count(),
            1,
            "no temporary files left behind"
        );
    }

    #[test]
    fn configured_key_wins_and_short_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("signing.key");
        assert_eq!(
            LocalStore::load_or_create_key("a-configured-secret-key", &file).unwrap(),
            b"a-configured-secret-key"
        );
        assert!(!file.exists(), "a configured key writes nothing");
        assert!(matches!(
            LocalStore::load_or_create_key("short", &file),
            Err(StorageError::Config(_))
        ));
        fs::write(&file, b"tiny").unwrap();
        let err = LocalStore::load_or_create_key("", &file).unwrap_err();
        assert!(
            matches!(&err, StorageError::Io(m) if m.contains("delete the file")),
            "{err}"
        );
    }

    #[test]
    fn new_checks_its_settings() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "127.0.0.1:8000", "ftp://x", "http://", "http://x/?a=b"] {
            let err = LocalStore::new(dir.path().into(), bad.into(), KEY.to_vec()).unwrap_err();
            assert!(
                matches!(&err, StorageError::Config(m) if m.contains("public_base_url")),
                "{bad}: {err}"
            );
        }
        let err = LocalStore::new(dir.path().into(), "http://x".into(), vec![1; 4]).unwrap_err();
        assert!(
            matches!(&err, StorageError::Config(m) if m.contains("signing_key")),
            "{err}"
        );
        let s = LocalStore::new(
            dir.path().join("a/b"),
            "https://img.example.com/base/".into(),
            KEY.to_vec(),
        )
        .unwrap();
        assert_eq!(s.public_base_url(), "https://img.example.com/base");
        assert!(dir.path().join("a/b").is_dir());
    }

    #[tokio::test]
    async fn health_checks_the_folder_is_writable() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.health().await.unwrap();
        assert_eq!(
            fs::read_dir(s.root()).unwrap().count(),
            0,
            "the probe cleans up"
        );
        fs::remove_dir_all(s.root()).unwrap();
        fs::write(s.root(), b"now a file").unwrap();
        assert!(matches!(s.health().await, Err(StorageError::Io(_))));
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(to_hex(&[0, 15, 16, 255]), "000f10ff");
        assert_eq!(from_hex("000f10FF").unwrap(), vec![0, 15, 16, 255]);
        assert!(from_hex("0").is_none() && from_hex("0g").is_none() && from_hex("é0").is_none());
    }
}
