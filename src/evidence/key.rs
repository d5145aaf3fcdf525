//! The checkpoint signing key: one Ed25519 key with a name, in the Go/C2SP note
//! signer key format, kept in a file only its owner can read.
//!
//! The file (default `<data dir>/checkpoint.key`, written by `hj212-gateway
//! keygen` or by `serve` on first start) holds one line:
//!
//! ```text
//! PRIVATE+KEY+<name>+<8 hex key id>+<base64(0x01 || 32-byte Ed25519 seed)>
//! ```
//!
//! the signer key format of Go's `golang.org/x/mod/sumdb/note`, which
//! [`signed_note::StandardSigner::new`] also accepts, so the key can be used with
//! stock tools. The public half is published as a *verifier key* (C2SP
//! `signed-note`, "Verifier keys"):
//!
//! ```text
//! <key name>+hex(32-bit key ID)+base64(signature type || public key)
//! ```
//!
//! with key ID = `SHA-256(key name || 0x0A || 0x01 || public key)[:4]`.
//!
//! Whoever reads the file can sign checkpoints in the gateway's name, so
//! [`SigningKey::load`] refuses a file that its group or others can access (like
//! `ssh` does), and [`SigningKey::write_new`] creates it with mode 0600 from the
//! first byte, never widening and narrowing afterwards.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::Signer as _;
use rand_core::OsRng;

/// The file name of the key inside the data directory.
pub const KEY_FILE: &str = "checkpoint.key";

/// The largest key file [`SigningKey::load`] reads. A valid key line is about
/// 100 bytes plus the name; anything near this is not a key.
pub const MAX_KEY_FILE_BYTES: u64 = 4096;

/// Signature type byte of Ed25519 note signatures (C2SP `signed-note`: "`0x01` —
/// Ed25519 signatures as specified by this document").
const ALG_ED25519: u8 = 0x01;

/// The key file in `data_dir`: `<data_dir>/checkpoint.key`.
pub fn default_path(data_dir: &Path) -> PathBuf {
    data_dir.join(KEY_FILE)
}

/// The default key name (and so checkpoint origin): `hj212-gateway/<id>`, where
/// `id` is the gateway's MQTT client id or host name.
///
/// C2SP `signed-note`: "Key names MUST be non-empty and MUST NOT contain any
/// Unicode spaces or plus (U+002B) characters"; such characters in `id` become
/// `_`. An empty `id` gives plain `hj212-gateway`. The name should stay the same
/// for the life of a log: verifiers look keys up by it.
pub fn default_name(id: &str) -> String {
    let id: String = id
        .trim()
        .chars()
        .map(|c| {
            if c.is_whitespace() || c == '+' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    if id.is_empty() {
        "hj212-gateway".to_owned()
    } else {
        format!("hj212-gateway/{id}")
    }
}

/// This machine's host name (`/proc/sys/kernel/hostname`, else `$HOSTNAME`), for
/// [`default_name`] when there is no client id.
pub fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

/// Why a key could not be read, parsed or written. Every variant that concerns a
/// file names it.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// There is no key file at the path.
    #[error("{}: no signing key there (create one with `hj212-gateway keygen`)", path.display())]
    NotFound {
        /// The key file.
        path: PathBuf,
    },
    /// `write_new` found a file already there; it never overwrites a key.
    #[error("{}: a file already exists there; refusing to overwrite a signing key", path.display())]
    Exists {
        /// The key file.
        path: PathBuf,
    },
    /// The key file can be accessed by its group or by others.
    #[error(
        "{}: mode {mode:04o} lets group or others access the signing key; run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file is not a note signer key.
    #[error("{}: not a signing key: {reason}", path.display())]
    Format {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A key text (not from a file) is not a note signer key.
    #[error("not a signing key: {0}")]
    Parse(String),
    /// The key name breaks the signed-note rules.
    #[error(
        "key name {0:?} is invalid: a key name must be non-empty and contain no spaces and no '+'"
    )]
    InvalidName(String),
    /// Reading or writing the file failed.
    #[error("{}: {op}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// A named Ed25519 checkpoint signing key.
///
/// Implements [`signed_note::Signer`], so it signs notes directly
/// ([`signed_note::Note::add_sigs`]). `Debug` shows the name and key id only;
/// the secret is zeroed on drop (ed25519-dalek's `zeroize`).
pub struct SigningKey {
    name: String,
    id: u32,
    key: ed25519_dalek::SigningKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("name", &self.name)
            .field("id", &format_args!("{:08x}", self.id))
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh key named `name`, from the operating system's CSPRNG.
    pub fn generate(name: &str) -> Result<SigningKey, KeyError> {
        check_name(name)?;
        Ok(SigningKey::from_dalek(
            name,
            ed25519_dalek::SigningKey::generate(&mut OsRng),
        ))
    }

    /// The key from its 32-byte Ed25519 seed (RFC 8032 private key).
    pub fn from_seed(name: &str, seed: &[u8; 32]) -> Result<SigningKey, KeyError> {
        check_name(name)?;
        Ok(SigningKey::from_dalek(
            name,
            ed25519_dalek::SigningKey::from_bytes(seed),
        ))
    }

    fn from_dalek(name: &str, key: ed25519_dalek::SigningKey) -> SigningKey {
        let id = signed_note::key_id(name, &public_material(&key.verifying_key()));
        SigningKey {
            name: name.to_owned(),
            id,
            key,
        }
    }

    /// Parses a note signer key:
    /// `PRIVATE+KEY+<name>+<8 hex key id>+<base64(0x01 || 32-byte seed)>`.
    ///
    /// The key id must be the one the name and public key give
    /// (`SHA-256(name || 0x0A || 0x01 || public key)[:4]`), so a key whose name
    /// or id was edited is refused rather than producing signatures no verifier
    /// key matches. Surrounding whitespace (a final newline) is ignored.
    pub fn parse(text: &str) -> Result<SigningKey, KeyError> {
        let bad = |why: &str| KeyError::Parse(why.to_owned());
        let text = text.trim();
        let rest = text
            .strip_prefix("PRIVATE+KEY+")
            .ok_or_else(|| bad("it does not start with PRIVATE+KEY+"))?;
        // Neither the name nor the hex id contains '+'; the base64 key may.
        let (name, rest) = rest
            .split_once('+')
            .ok_or_else(|| bad("expected PRIVATE+KEY+<name>+<id>+<key>"))?;
        let (id16, key64) = rest
            .split_once('+')
            .ok_or_else(|| bad("expected PRIVATE+KEY+<name>+<id>+<key>"))?;
        if !signed_note::is_key_name_valid(name) {
            return Err(bad(&format!(
                "key name {name:?} is empty or contains a space or '+'"
            )));
        }
        if id16.len() != 8 || !id16.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(&format!("key id {id16:?} is not 8 hex digits")));
        }
        let id = u32::from_str_radix(id16, 16).map_err(|_| bad("key id is not hex"))?;
        let raw = BASE64
            .decode(key64)
            .map_err(|e| bad(&format!("key material is not base64: {e}")))?;
        let Some((&alg, seed)) = raw.split_first() else {
            return Err(bad("key material is empty"));
        };
        if alg != ALG_ED25519 {
            return Err(bad(&format!(
                "signature type 0x{alg:02x} is not Ed25519 (0x01)"
            )));
        }
        let seed: &[u8; 32] = seed.try_into().map_err(|_| {
            bad(&format!(
                "Ed25519 seed is {} bytes, expected 32",
                seed.len()
            ))
        })?;
        let key = SigningKey::from_dalek(name, ed25519_dalek::SigningKey::from_bytes(seed));
        if key.id != id {
            return Err(bad(&format!(
                "key id {id:08x} does not match the name and key (expected {:08x})",
                key.id
            )));
        }
        Ok(key)
    }

    /// Reads the key file at `path`.
    ///
    /// Refused: a missing file ([`KeyError::NotFound`]), one its group or others
    /// can access ([`KeyError::Permissions`]: `chmod 600` it), one larger than
    /// [`MAX_KEY_FILE_BYTES`] or not holding exactly one signer key line
    /// ([`KeyError::Format`]). The mode is read from the opened file, so a
    /// rename between check and read cannot slip another file in.
    pub fn load(path: &Path) -> Result<SigningKey, KeyError> {
        let io = |op| {
            move |source: io::Error| KeyError::Io {
                path: path.to_owned(),
                op,
                source,
            }
        };
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(KeyError::NotFound {
                    path: path.to_owned(),
                });
            }
            Err(e) => return Err(io("open")(e)),
        };
        let meta = file.metadata().map_err(io("stat"))?;
        if !meta.is_file() {
            return Err(KeyError::Format {
                path: path.to_owned(),
                reason: "not a regular file".into(),
            });
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        let mut bytes = Vec::with_capacity(256);
        file.take(MAX_KEY_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io("read"))?;
        let format = |reason: String| KeyError::Format {
            path: path.to_owned(),
            reason,
        };
        if bytes.len() as u64 > MAX_KEY_FILE_BYTES {
            return Err(format(format!("larger than {MAX_KEY_FILE_BYTES} bytes")));
        }
        let text = std::str::from_utf8(&bytes).map_err(|_| format("not UTF-8 text".into()))?;
        if text.trim().lines().count() != 1 {
            return Err(format("expected exactly one line".into()));
        }
        SigningKey::parse(text).map_err(|e| match e {
            KeyError::Parse(reason) => format(reason),
            other => other,
        })
    }

    /// Generates a key named `name` and writes it to `path`, which must not
    /// exist; creates the parent directory (mode 0700) if it is missing.
    ///
    /// The key is written to a temporary file created with mode 0600, synced,
    /// then hard-linked to `path`: the link fails if `path` exists (so a key is
    /// never overwritten, even by a concurrent writer) and `path` never holds a
    /// partial key. The directory is synced so the key survives a crash.
    pub fn write_new(path: &Path, name: &str) -> Result<SigningKey, KeyError> {
        let key = SigningKey::generate(name)?;
        key.write_to(path)?;
        Ok(key)
    }

    fn write_to(&self, path: &Path) -> Result<(), KeyError> {
        let io = |p: &Path, op| {
            let p = p.to_owned();
            move |source: io::Error| KeyError::Io {
                path: p,
                op,
                source,
            }
        };
        if fs::symlink_metadata(path).is_ok() {
            return Err(KeyError::Exists {
                path: path.to_owned(),
            });
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io(&dir, "create directory"))?;
        }
        let file_name = path
            .file_name()
            .ok_or_else(|| KeyError::Format {
                path: path.to_owned(),
                reason: "the path has no file name".into(),
            })?
            .to_string_lossy()
            .into_owned();
        let tmp = dir.join(format!(
            ".{file_name}.tmp-{}-{:08x}",
            std::process::id(),
            rand_core::RngCore::next_u32(&mut OsRng)
        ));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io(&tmp, "create"))?;
            let mut line = self.to_text();
            line.push('\n');
            f.write_all(line.as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(io(&tmp, "write"))?;
            match fs::hard_link(&tmp, path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(KeyError::Exists {
                    path: path.to_owned(),
                }),
                Err(e) => Err(io(path, "link")(e)),
            }
        })();
        // The temporary name goes either way; the key, if linked, stays at `path`.
        let _ = fs::remove_file(&tmp);
        result?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&dir, "sync directory"))?;
        Ok(())
    }

    /// Loads the key at `path`, or, when there is no file there, generates one
    /// named `name` and writes it ([`SigningKey::write_new`]). The flag is true
    /// when the key was generated. An existing key keeps its own name, whatever
    /// `name` says; any other load error is returned, never papered over with a
    /// new key.
    pub fn load_or_generate(path: &Path, name: &str) -> Result<(SigningKey, bool), KeyError> {
        match SigningKey::load(path) {
            Ok(k) => Ok((k, false)),
            Err(KeyError::NotFound { .. }) => match SigningKey::write_new(path, name) {
                Ok(k) => Ok((k, true)),
                // Another process created it between our load and write: use theirs.
                Err(KeyError::Exists { .. }) => SigningKey::load(path).map(|k| (k, false)),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// The key name (the checkpoint origin should be the same string: C2SP
    /// `tlog-checkpoint`, "The log's key name in its signature line SHOULD match
    /// the origin line").
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The 32-bit key id, `SHA-256(name || 0x0A || 0x01 || public key)[:4]`.
    pub fn key_id(&self) -> u32 {
        self.id
    }

    /// The 32-byte Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// The verifier key, `<name>+<8 hex id>+<base64(0x01 || public key)>`: what
    /// auditors configure to check checkpoints.
    pub fn verifier_key(&self) -> String {
        signed_note::new_ed25519_verifier_key(&self.name, &self.key.verifying_key())
    }

    /// This key as a note signer.
    pub fn signer(&self) -> &dyn signed_note::Signer {
        self
    }

    /// The signer key line (secret!), as written to the key file without the
    /// newline.
    fn to_text(&self) -> String {
        let mut material = Vec::with_capacity(33);
        material.push(ALG_ED25519);
        material.extend_from_slice(&self.key.to_bytes());
        format!(
            "PRIVATE+KEY+{}+{:08x}+{}",
            self.name,
            self.id,
            BASE64.encode(&material)
        )
    }
}

impl signed_note::Signer for SigningKey {
    fn name(&self) -> &str {
        &self.name
    }

    fn key_id(&self) -> u32 {
        self.id
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, ed25519_dalek::SignatureError> {
        Ok(self.key.try_sign(msg)?.to_bytes().to_vec())
    }
}

fn check_name(name: &str) -> Result<(), KeyError> {
    if signed_note::is_key_name_valid(name) && !name.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(KeyError::InvalidName(name.to_owned()))
    }
}

/// `0x01 || public key`, the material the key id and verifier key encode.
fn public_material(vk: &ed25519_dalek::VerifyingKey) -> [u8; 33] {
    let mut m = [0u8; 33];
    m[0] = ALG_ED25519;
    m[1..].copy_from_slice(vk.as_bytes());
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use signed_note::{Note, Signer as _, StandardSigner, StandardVerifier, VerifierList};
    use std::os::unix::fs::PermissionsExt;

    // Go's golang.org/x/mod/sumdb/note test key and note (also the signed_note
    // crate's documented example).
    const GO_SKEY: &str =
        "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
    const GO_VKEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
    const GO_TEXT: &str = "If you think cryptography is the answer to your problem,\n\
                           then you don't know what your problem is.\n";
    const GO_NOTE: &str = "If you think cryptography is the answer to your problem,\n\
                           then you don't know what your problem is.\n\
                           \n\
                           — PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";

    #[test]
    fn go_vector_key_id_verifier_key_and_signature_byte_exact() {
        let k = SigningKey::parse(GO_SKEY).unwrap();
        assert_eq!(k.name(), "PeterNeumann");
        assert_eq!(k.key_id(), 0xc74f20a3);
        assert_eq!(k.verifier_key(), GO_VKEY);
        assert_eq!(k.to_text(), GO_SKEY);
        let mut n = Note::new(GO_TEXT.as_bytes(), &[]).unwrap();
        n.add_sigs(&[k.signer()]).unwrap();
        assert_eq!(String::from_utf8(n.to_bytes()).unwrap(), GO_NOTE);
    }

    #[test]
    fn key_id_is_sha256_of_name_newline_type_and_public_key() {
        use sha2::Digest as _;
        let k = SigningKey::from_seed("example.com/log", &[7u8; 32]).unwrap();
        let mut h = sha2::Sha256::new();
        h.update(b"example.com/log\n\x01");
        h.update(k.public_key());
        let d = h.finalize();
        assert_eq!(k.key_id(), u32::from_be_bytes([d[0], d[1], d[2], d[3]]));
    }

    #[test]
    fn generated_key_round_trips_through_stock_signer_and_verifier() {
        let k = SigningKey::generate("hj212-gateway/test").unwrap();
        let stock = StandardSigner::new(&k.to_text()).unwrap();
        assert_eq!(stock.key_id(), k.key_id());
        let v = StandardVerifier::new(&k.verifier_key()).unwrap();
        let mut n = Note::new(b"hello\n", &[]).unwrap();
        n.add_sigs(&[k.signer()]).unwrap();
        let n = Note::from_bytes(&n.to_bytes()).unwrap();
        let (ok, _) = n.verify(&VerifierList::new(vec![Box::new(v)])).unwrap();
        assert_eq!(ok.len(), 1);
        // Ed25519 is deterministic: our signature equals the stock signer's.
        assert_eq!(k.sign(b"x").unwrap(), stock.sign(b"x").unwrap());
    }

    #[test]
    fn parse_refuses_edited_or_malformed_keys() {
        let cases = [
            ("", "PRIVATE+KEY"),
            ("PRIVATE+KEY+PeterNeumann+c74f20a3", "expected"),
            (
                "PRIVATE+KEY+PeterNeumann+c74f20a4+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz",
                "does not match",
            ),
            (
                "PRIVATE+KEY+PeterNewman+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz",
                "does not match",
            ),
            (
                "PRIVATE+KEY+P+c74f20a+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz",
                "8 hex",
            ),
            ("PRIVATE+KEY++c74f20a3+AYEK", "key name"),
            ("PRIVATE+KEY+a b+c74f20a3+AYEK", "key name"),
            ("PRIVATE+KEY+P+c74f20a3+AYEK", "32"),
            ("PRIVATE+KEY+P+c74f20a3+!!!!", "base64"),
            (
                "PRIVATE+KEY+P+c74f20a3+AoEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz",
                "0x02",
            ),
        ];
        for (text, want) in cases {
            let e = SigningKey::parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn names_are_validated_and_default_name_is_valid() {
        assert!(matches!(
            SigningKey::generate("a+b"),
            Err(KeyError::InvalidName(_))
        ));
        assert!(SigningKey::generate("").is_err());
        assert!(SigningKey::generate("a b").is_err());
        assert_eq!(default_name("gw-01"), "hj212-gateway/gw-01");
        assert_eq!(default_name(" a+b c "), "hj212-gateway/a_b_c");
        assert_eq!(default_name(""), "hj212-gateway");
        assert!(signed_note::is_key_name_valid(&default_name("x\ty")));
    }

    #[test]
    fn write_new_creates_0600_in_a_0700_dir_and_never_overwrites() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("state/sub/checkpoint.key");
        let k = SigningKey::write_new(&path, "hj212-gateway/t").unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode & 0o077, 0, "dir mode {dmode:o}");
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("PRIVATE+KEY+hj212-gateway/t+") && text.ends_with('\n'));
        assert!(StandardSigner::new(text.trim_end()).is_ok());
        let again = SigningKey::load(&path).unwrap();
        assert_eq!(again.verifier_key(), k.verifier_key());

        let e = SigningKey::write_new(&path, "hj212-gateway/t").unwrap_err();
        assert!(matches!(e, KeyError::Exists { .. }), "{e}");
        assert!(e.to_string().contains(&path.display().to_string()));
        assert_eq!(fs::read_to_string(&path).unwrap(), text, "key unchanged");
        // No temporary files left behind.
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn load_errors_name_the_path_and_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("checkpoint.key");
        let e = SigningKey::load(&path).unwrap_err();
        assert!(matches!(e, KeyError::NotFound { .. }));
        assert!(e.to_string().contains(&path.display().to_string()));

        SigningKey::write_new(&path, "n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let e = SigningKey::load(&path).unwrap_err().to_string();
        assert!(e.contains("chmod 600") && e.contains("0640"), "{e}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o604)).unwrap();
        assert!(SigningKey::load(&path).is_err());

        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let key = fs::read_to_string(&path).unwrap();
        fs::write(&path, format!("{key}{key}")).unwrap();
        let e = SigningKey::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("one line") && e.contains("checkpoint.key"),
            "{e}"
        );
        fs::write(&path, "not a key\n").unwrap();
        let e = SigningKey::load(&path).unwrap_err().to_string();
        assert!(e.contains("not a signing key"), "{e}");
        fs::write(&path, vec![b'A'; 5000]).unwrap();
        let e = SigningKey::load(&path).unwrap_err().to_string();
        assert!(e.contains("larger than"), "{e}");
    }

    #[test]
    fn load_or_generate_generates_once_then_loads() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("checkpoint.key");
        let (a, generated) = SigningKey::load_or_generate(&path, "first").unwrap();
        assert!(generated);
        let (b, generated) = SigningKey::load_or_generate(&path, "second").unwrap();
        assert!(!generated);
        assert_eq!(b.name(), "first");
        assert_eq!(a.verifier_key(), b.verifier_key());
        // A bad file is an error, not a reason to make a new key.
        fs::write(&path, "junk\n").unwrap();
        assert!(SigningKey::load_or_generate(&path, "x").is_err());
    }

    #[test]
    fn debug_does_not_show_the_secret() {
        let k = SigningKey::parse(GO_SKEY).unwrap();
        let d = format!("{k:?}");
        assert!(d.contains("PeterNeumann") && d.contains("c74f20a3"));
        assert!(!d.contains("AYEK"));
    }
}
