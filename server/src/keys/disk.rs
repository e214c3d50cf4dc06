//! The `disk` key manager: one PKCS#8 file per key, mode 0600, in a 0700 directory,
//! written atomically (temp file + fsync + rename) so a crash never leaves half a key.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use continuity_common::fsperm::{SecureDir, secure_dir};
use continuity_common::secret::Zeroizing;

use super::software::SoftwareKey;
use super::{Kek, KeyError, KeyHandle, KeyManager, KeyType, MacKey, SoftwareKek, SoftwareMac};

/// Keys as files under a directory; they survive restarts.
#[derive(Debug)]
pub struct DiskKeyManager {
    dir: PathBuf,
    /// The verified key directory, held open: key files are created through it.
    secure: SecureDir,
    cache: Mutex<HashMap<String, Arc<SoftwareKey>>>,
    keks: Mutex<HashMap<String, Arc<SoftwareKek>>>,
    macs: Mutex<HashMap<String, Arc<SoftwareMac>>>,
}

fn storage(what: &str, path: &Path, e: std::io::Error) -> KeyError {
    KeyError::Storage(format!("{what} {}: {e}", path.display()))
}

impl DiskKeyManager {
    /// Opens (creating with 0700 if needed) the key directory, refusing one another user could
    /// have made or changed (see [`continuity_common::fsperm`]).
    pub fn open(dir: &Path) -> Result<Self, KeyError> {
        let secure = secure_dir(dir, 0o700, "key directory")
            .map_err(|e| KeyError::Storage(e.to_string()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            secure,
            cache: Mutex::default(),
            keks: Mutex::default(),
            macs: Mutex::default(),
        })
    }

    fn path(&self, id: &str) -> Result<PathBuf, KeyError> {
        if id.is_empty()
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            || id.starts_with('.')
        {
            return Err(KeyError::Storage(format!("invalid key id {id:?}")));
        }
        Ok(self.dir.join(format!("{id}.key")))
    }

    fn write(&self, key: &SoftwareKey) -> Result<(), KeyError> {
        let path = self.path(key.id())?;
        // Every plaintext copy of the key (its base64, the file body) is wiped when dropped.
        let b64 = Zeroizing::new(STANDARD.encode(key.pkcs8()));
        let body = Zeroizing::new(format!("{}\n{}\n", key.key_type().as_str(), b64.as_str()));
        self.write_file(&path, &body)
    }

    /// Writes a secret file atomically with mode 0600 (temp file created `O_EXCL | O_NOFOLLOW`
    /// in the verified directory, fsync, rename).
    fn write_file(&self, path: &Path, body: &str) -> Result<(), KeyError> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| KeyError::Storage(format!("invalid key file {}", path.display())))?;
        self.secure
            .write_atomic(name, 0o600, |f| f.write_all(body.as_bytes()))
            .map_err(|e| KeyError::Storage(e.to_string()))
    }

    /// The 32 random bytes kept in `<id>.<ext>` (base64, 0600), made on first use. Callers hold
    /// their cache lock, so two first uses cannot write two different keys.
    fn secret_file(&self, id: &str, ext: &str, what: &str) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let path = self.path(id)?.with_extension(ext);
        match read_secret(&path) {
            Ok(text) => {
                let malformed = |why: String| {
                    KeyError::Storage(format!(
                        "{what} file {} is malformed: {why}",
                        path.display()
                    ))
                };
                let raw = Zeroizing::new(
                    STANDARD
                        .decode(text.trim())
                        .map_err(|e| malformed(e.to_string()))?,
                );
                // An empty or cut-short file (a torn write of an older version) is never taken
                // for a shorter key.
                if raw.len() != 32 {
                    return Err(malformed(format!("{} bytes, expected 32", raw.len())));
                }
                Ok(raw)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let raw = super::aes::generate()?;
                let body = Zeroizing::new(format!("{}\n", STANDARD.encode(&*raw)));
                // Created only if absent: a server sharing this directory that made it first
                // wins, and this one reads what it made.
                if self.write_new_file(&path, &body)? {
                    Ok(raw)
                } else {
                    self.secret_file(id, ext, what)
                }
            }
            Err(e) => Err(storage(&format!("cannot read {what} file"), &path, e)),
        }
    }

    /// Creates a secret file (0600) only if it does not exist; false if it did.
    fn write_new_file(&self, path: &Path, body: &str) -> Result<bool, KeyError> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| KeyError::Storage(format!("invalid key file {}", path.display())))?;
        self.secure
            .write_new(name, 0o600, |f| f.write_all(body.as_bytes()))
            .map_err(|e| KeyError::Storage(e.to_string()))
    }

    fn read(&self, id: &str) -> Result<Option<SoftwareKey>, KeyError> {
        let path = self.path(id)?;
        let text = match read_secret(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(storage("cannot read key file", &path, e)),
        };
        let mut lines = text.lines();
        let (Some(kt), Some(b64)) = (lines.next(), lines.next()) else {
            return Err(KeyError::Storage(format!(
                "key file {} is malformed",
                path.display()
            )));
        };
        let key_type: KeyType = kt.parse().map_err(KeyError::Storage)?;
        let pkcs8 = STANDARD.decode(b64.trim()).map_err(|e| {
            KeyError::Storage(format!("key file {} is malformed: {e}", path.display()))
        })?;
        SoftwareKey::from_pkcs8(id, key_type, pkcs8).map(Some)
    }
}

/// Reads a key or KEK file into one buffer sized from its length (no reallocation leaves a
/// copy behind), wiped on drop.
fn read_secret(path: &Path) -> std::io::Result<Zeroizing<String>> {
    use std::io::Read;
    let f = fs::File::open(path)?;
    let len = f.metadata()?.len();
    // Key files are a few KiB; a huge one is not ours.
    if len > 64 * 1024 {
        return Err(std::io::Error::other(format!("{len} bytes is too large")));
    }
    let mut text = Zeroizing::new(String::with_capacity(len as usize + 1));
    f.take(64 * 1024).read_to_string(&mut text)?;
    Ok(text)
}

#[async_trait]
impl KeyManager for DiskKeyManager {
    fn kind(&self) -> &'static str {
        "disk"
    }

    async fn generate(&self, id: &str, key_type: KeyType) -> Result<Arc<dyn KeyHandle>, KeyError> {
        let id_owned = id.to_string();
        let key = tokio::task::spawn_blocking(move || SoftwareKey::generate(&id_owned, key_type))
            .await
            .map_err(|e| KeyError::Storage(e.to_string()))??;
        self.write(&key)?;
        let key = Arc::new(key);
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), key.clone());
        Ok(key)
    }

    async fn get(&self, id: &str) -> Result<Option<Arc<dyn KeyHandle>>, KeyError> {
        if let Some(k) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(id) {
            return Ok(Some(k.clone()));
        }
        let Some(key) = self.read(id)? else {
            return Ok(None);
        };
        let key = Arc::new(key);
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), key.clone());
        Ok(Some(key))
    }

    async fn kek(&self, id: &str) -> Result<Arc<dyn Kek>, KeyError> {
        let mut keks = self.keks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = keks.get(id) {
            return Ok(k.clone());
        }
        let mut raw = self.secret_file(id, "kek", "KEK")?;
        // Moved, not copied: the only plaintext KEK is the one SoftwareKek wipes on drop.
        let k = Arc::new(SoftwareKek(std::mem::take(&mut *raw)));
        keks.insert(id.to_string(), k.clone());
        Ok(k)
    }

    async fn mac_key(&self, id: &str) -> Result<Arc<dyn MacKey>, KeyError> {
        let mut macs = self.macs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = macs.get(id) {
            return Ok(k.clone());
        }
        let k = Arc::new(SoftwareMac::new(&self.secret_file(id, "mac", "MAC key")?));
        macs.insert(id.to_string(), k.clone());
        Ok(k)
    }

    async fn delete(&self, id: &str) -> Result<(), KeyError> {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        let path = self.path(id)?;
        let name = path.file_name().unwrap_or_default();
        // Durable: the directory is fsynced, so a deleted key does not come back after a crash.
        self.secure
            .remove_file(name)
            .map_err(|e| KeyError::Storage(format!("cannot delete key file: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn keys_survive_reopen_with_0600_files() {
        let dir = tempfile_dir();
        let km = DiskKeyManager::open(&dir).unwrap();
        let k = km.generate("ca-1", KeyType::EcP256).await.unwrap();
        let mode = fs::metadata(dir.join("ca-1.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let km2 = DiskKeyManager::open(&dir).unwrap();
        let k2 = km2.get("ca-1").await.unwrap().unwrap();
        assert_eq!(k.public_key_raw(), k2.public_key_raw());
        km2.delete("ca-1").await.unwrap();
        assert!(km2.get("ca-1").await.unwrap().is_none());
        let _ = fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn mac_keys_live_in_0600_files_and_survive_reopen() {
        let dir = tempfile_dir().with_extension("mac");
        let km = DiskKeyManager::open(&dir).unwrap();
        let tag = km.mac_key("record-mac").await.unwrap().mac(b"row").unwrap();
        let mode = fs::metadata(dir.join("record-mac.mac"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let km2 = DiskKeyManager::open(&dir).unwrap();
        let again = km2.mac_key("record-mac").await.unwrap();
        assert_eq!(again.mac(b"row").unwrap(), tag);
        assert!(again.verify(b"row", &tag).unwrap());
        assert!(!again.verify(b"row!", &tag).unwrap());
        assert_ne!(
            km2.mac_key("audit-mac").await.unwrap().mac(b"row").unwrap(),
            tag
        );
        // A torn write (empty or cut short) is an error naming the file, never a short key.
        for (i, torn) in ["", "\n", "AAAA\n"].into_iter().enumerate() {
            fs::write(dir.join(format!("torn{i}.mac")), torn).unwrap();
            fs::write(dir.join(format!("torn{i}.kek")), torn).unwrap();
            let err = km2.mac_key(&format!("torn{i}")).await.unwrap_err();
            let err = err.to_string();
            assert!(
                err.contains(&format!("torn{i}.mac")) && err.contains("malformed"),
                "{torn:?}: {err}"
            );
            let Err(err) = km2.kek(&format!("torn{i}")).await else {
                panic!("{torn:?}: a torn KEK file was accepted");
            };
            assert!(err.to_string().contains("KEK file"), "{torn:?}: {err}");
        }
        fs::write(dir.join("broken.mac"), "not base64!").unwrap();
        let err = km2.mac_key("broken").await.unwrap_err().to_string();
        assert!(
            err.contains("MAC key file") && err.contains("malformed"),
            "{err}"
        );
        let _ = fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("continuity-disk-km-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }
}
