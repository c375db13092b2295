//! The password file (`auth.password_file`): one `username:hash` per line, `#` comments and
//! blank lines ignored. Two hash forms are read:
//!
//! - Argon2id in the PHC string form (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`), which
//!   `shardmq passwd` writes;
//! - Mosquitto's `$7$<iterations>$<salt>$<hash>` (PBKDF2-HMAC-SHA512, base64), which
//!   `mosquitto_passwd` writes, so an existing Mosquitto password file works as it is.
//!
//! A line in any other form stops the load with the file and line named. The file is read at
//! start and again on reload; a reload that fails keeps the users loaded before.

use super::{Authenticator, Decision};
use crate::core::auth::{AuthOutcome, AuthRequest};
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::Engine as _;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use subtle::ConstantTimeEq;

/// A stored hash.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stored {
    /// A PHC string of an Argon2 hash.
    Argon2(String),
    /// Mosquitto's PBKDF2-HMAC-SHA512.
    Pbkdf2Sha512 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

impl Stored {
    fn parse(text: &str) -> Result<Stored, String> {
        if text.starts_with("$argon2") {
            PasswordHash::new(text).map_err(|e| format!("not an Argon2 PHC string: {e}"))?;
            return Ok(Stored::Argon2(text.to_string()));
        }
        if let Some(rest) = text.strip_prefix("$7$") {
            let b64 = base64::engine::general_purpose::STANDARD;
            let mut parts = rest.split('$');
            let (Some(i), Some(salt), Some(hash), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err("a $7$ hash is $7$<iterations>$<salt>$<hash>".into());
            };
            let iterations: u32 = i
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .ok_or("the $7$ iteration count is not a positive number")?;
            let salt = b64.decode(salt).map_err(|_| "the $7$ salt is not base64")?;
            let hash = b64.decode(hash).map_err(|_| "the $7$ hash is not base64")?;
            if hash.len() != 64 {
                return Err("a $7$ hash is 64 bytes (PBKDF2-HMAC-SHA512)".into());
            }
            return Ok(Stored::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            });
        }
        Err("unsupported hash (expected $argon2id$… from `shardmq passwd`, or $7$… from mosquitto_passwd)".into())
    }

    fn verify(&self, password: &[u8]) -> bool {
        match self {
            Stored::Argon2(phc) => PasswordHash::new(phc)
                .is_ok_and(|h| Argon2::default().verify_password(password, &h).is_ok()),
            Stored::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => {
                let mut out = [0u8; 64];
                pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password, salt, *iterations, &mut out);
                bool::from(out.ct_eq(hash.as_slice()))
            }
        }
    }
}

/// Parses a password file's text; errors name the line.
fn parse(text: &str) -> Result<HashMap<String, Stored>, String> {
    let mut users = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((user, hash)) = line.split_once(':') else {
            return Err(format!("line {}: expected username:hash", n + 1));
        };
        if user.is_empty() {
            return Err(format!("line {}: empty username", n + 1));
        }
        let stored = Stored::parse(hash).map_err(|e| format!("line {}: {e}", n + 1))?;
        users.insert(user.to_string(), stored);
    }
    Ok(users)
}

/// The users of a password file.
pub struct PasswordFile {
    path: PathBuf,
    users: RwLock<HashMap<String, Stored>>,
}

impl PasswordFile {
    /// Reads `path`.
    pub fn load(path: &Path) -> Result<PasswordFile, String> {
        Ok(PasswordFile {
            path: path.to_path_buf(),
            users: RwLock::new(read(path)?),
        })
    }

    /// Users loaded.
    pub fn len(&self) -> usize {
        self.users.read().map_or(0, |u| u.len())
    }

    /// Whether no user is loaded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn read(path: &Path) -> Result<HashMap<String, Stored>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

impl Authenticator for PasswordFile {
    fn name(&self) -> &str {
        "password_file"
    }

    fn authenticate(&self, req: &AuthRequest) -> Decision {
        let Some(user) = req.username.as_deref() else {
            return Decision::Ignore;
        };
        let Ok(users) = self.users.read() else {
            return Decision::Ignore;
        };
        let Some(stored) = users.get(user) else {
            return Decision::Ignore;
        };
        let password = req.password.as_deref().unwrap_or(&[]);
        if stored.verify(password) {
            Decision::Allow
        } else {
            Decision::Deny(AuthOutcome::BadCredentials)
        }
    }

    fn reload(&self) -> Result<(), String> {
        let users = read(&self.path)?;
        if let Ok(mut u) = self.users.write() {
            *u = users;
        }
        Ok(())
    }
}

/// An Argon2id hash of `password` with a fresh salt, as a PHC string.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash: {e}"))
}

/// Sets `user`'s password in the file at `path` (created, readable by its owner only, if
/// missing), or removes the user when `password` is `None`. Other lines stay as they are.
/// Returns whether the user was there before.
pub fn set_user(path: &Path, user: &str, password: Option<&str>) -> Result<bool, String> {
    if user.is_empty() || user.contains(':') || user.contains(char::is_whitespace) {
        return Err(format!(
            "{user:?}: a username is not empty and holds no ':' or space"
        ));
    }
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let entry = password.map(hash_password).transpose()?;
    let mut found = false;
    let mut out = String::new();
    for line in text.lines() {
        let mine = line
            .trim()
            .split_once(':')
            .is_some_and(|(u, _)| u == user && !line.trim().starts_with('#'));
        if mine {
            found = true;
            if let Some(h) = &entry {
                out.push_str(&format!("{user}:{h}\n"));
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !found {
        match &entry {
            Some(h) => out.push_str(&format!("{user}:{h}\n")),
            None => return Err(format!("no user {user:?} in {}", path.display())),
        }
    }
    write_private(path, out.as_bytes())?;
    Ok(found)
}

/// Writes `data` to `path` through a temporary file renamed over it, mode 0600.
fn write_private(path: &Path, data: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp-shardmq");
    let err = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2_round_trip() {
        let h = hash_password("s3cret pass").unwrap();
        let s = Stored::parse(&h).unwrap();
        assert!(s.verify(b"s3cret pass"));
        assert!(!s.verify(b"s3cret pasS"));
    }

    /// A line mosquitto_passwd 2.0 wrote for user `alice`, password `wonderland`.
    #[test]
    fn mosquitto_lines_verify() {
        // PBKDF2-HMAC-SHA512, 101 iterations, computed here the way mosquitto_passwd does.
        let salt = b"0123456789ab";
        let mut out = [0u8; 64];
        pbkdf2::pbkdf2_hmac::<sha2::Sha512>(b"wonderland", salt, 101, &mut out);
        let b64 = base64::engine::general_purpose::STANDARD;
        let line = format!("alice:$7$101${}${}\n", b64.encode(salt), b64.encode(out));
        let users = parse(&line).unwrap();
        assert!(users["alice"].verify(b"wonderland"));
        assert!(!users["alice"].verify(b"wonderlanD"));
    }

    #[test]
    fn bad_lines_name_themselves() {
        let e = parse("# users\n\nbob:$6$abc$def\n").unwrap_err();
        assert!(e.starts_with("line 3:"), "{e}");
        assert!(parse("nocolon\n").unwrap_err().contains("username:hash"));
        assert!(parse(":$7$1$AA==$AA==\n")
            .unwrap_err()
            .contains("empty username"));
        assert!(parse("x:$7$0$AA==$AA==\n")
            .unwrap_err()
            .contains("iteration"));
    }

    #[test]
    fn set_user_adds_replaces_and_removes() {
        let dir = std::env::temp_dir().join(format!("shardmq-passwd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("passwd");
        let _ = std::fs::remove_file(&path);
        assert!(!set_user(&path, "alice", Some("one-password")).unwrap());
        assert!(!set_user(&path, "bob", Some("two-password")).unwrap());
        assert!(set_user(&path, "alice", Some("new-password")).unwrap());
        let users = read(&path).unwrap();
        assert_eq!(users.len(), 2);
        assert!(users["alice"].verify(b"new-password"));
        assert!(users["bob"].verify(b"two-password"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(set_user(&path, "bob", None).unwrap());
        assert_eq!(read(&path).unwrap().len(), 1);
        assert!(set_user(&path, "carol", None).is_err());
        assert!(set_user(&path, "a:b", Some("x")).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
