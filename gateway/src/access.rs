//! Who may connect: identities, roles and the credentials file.
//!
//! Identities come from the credentials file (one entry per device or operator, with an
//! argon2id hash of a random secret that is shown once, by `watchpost device add`), or from a
//! client certificate on the TLS listener (its common name), or are anonymous when
//! `broker.allow_anonymous` says so. What each may publish and subscribe to is the topic
//! ACL's to say ([`crate::acl`]); both are enforced by Watchpost's own connection front
//! ([`crate::broker`]). `SECURITY.md` has the whole threat model.
//!
//! A named client's MQTT client id must be its name or start with `name@`, so that no client
//! can take over another's session (or the gateway's internal link, which has a reserved id).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use serde::{Deserialize, Serialize};

/// What a named client is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A sensor: publishes its own readings.
    Device,
    /// A person or service watching: subscribes, never publishes.
    Operator,
    /// The site's other gateway, admitted by a token of the shared peer secret
    /// ([`crate::peer`]); never in the credentials file.
    #[serde(skip)]
    Peer,
}

/// Who a connected client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// No credentials (only when anonymous clients are allowed).
    Anonymous,
    /// A name from the credentials file or a client certificate.
    Named {
        /// Device or operator name.
        name: String,
        /// What it may do.
        role: Role,
    },
}

impl Identity {
    /// The name, for logs and counters.
    pub fn name(&self) -> Option<&str> {
        match self {
            Identity::Anonymous => None,
            Identity::Named { name, .. } => Some(name),
        }
    }
}

/// May a client known as `who` use `client_id`? Named clients use their name, or `name@...`;
/// anonymous clients may not use a registered name.
pub fn may_use_client_id(who: &Identity, client_id: &str, credentials: &Credentials) -> bool {
    let base = client_id.split('@').next().unwrap_or(client_id);
    match who {
        Identity::Named { name, .. } => base == name,
        Identity::Anonymous => !credentials.contains(base),
    }
}

/// One entry of the credentials file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Device or operator.
    pub role: Role,
    /// argon2id hash of the secret, PHC string format.
    pub secret: String,
    /// When it was added, RFC 3339.
    pub created: String,
}

/// The credentials file: names, roles and hashed secrets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// Entries by name.
    #[serde(default, rename = "client")]
    pub clients: BTreeMap<String, Entry>,
}

/// Errors of the credentials file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialsError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a credentials file.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The name is taken.
    #[error("{0:?} already exists; remove it first to give it a new secret")]
    Exists(String),
    /// The name is not a valid name.
    #[error("{0:?} is not a valid name: use letters, digits, '-', '_' and '.' only")]
    BadName(String),
    /// The operating system gave no randomness, or hashing failed.
    #[error("cannot make a secret: {0}")]
    Secret(String),
}

/// argon2id with 7 MiB of memory and 5 passes: one of the OWASP password-storage cheat
/// sheet's equivalent settings, chosen for its small memory on a gateway-sized machine. The
/// secrets are 128 random bits, so the hash guards a leaked file, not weak passwords.
fn hasher() -> Result<Argon2<'static>, CredentialsError> {
    let params = argon2::Params::new(7 * 1024, 5, 1, None)
        .map_err(|e| CredentialsError::Secret(e.to_string()))?;
    Ok(Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        params,
    ))
}

const HEADER: &str = "# Watchpost credentials: one [client.NAME] per device or operator.\n\
# Managed with `watchpost device add|remove|list`; secrets are argon2id hashes.\n\n";

impl Credentials {
    /// Reads the file; a missing file is an empty one.
    pub fn load(path: &Path) -> Result<Credentials, CredentialsError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Credentials::default()),
            Err(source) => {
                return Err(CredentialsError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let creds: Credentials = toml::from_str(&text).map_err(|e| CredentialsError::Format {
            path: path.to_owned(),
            message: e.message().to_owned(),
        })?;
        for (name, entry) in &creds.clients {
            if PasswordHash::new(&entry.secret).is_err() {
                return Err(CredentialsError::Format {
                    path: path.to_owned(),
                    message: format!("the secret of {name:?} is not an argon2 hash"),
                });
            }
        }
        Ok(creds)
    }

    /// Writes the file atomically (a new file renamed over the old), readable by its owner
    /// only, and owned like its directory so that the gateway's service user can read it
    /// after an administrator wrote it.
    pub fn save(&self, path: &Path) -> Result<(), CredentialsError> {
        let io = |source| CredentialsError::Io {
            path: path.to_owned(),
            source,
        };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io)?;
        let text = HEADER.to_owned()
            + &toml::to_string(self).map_err(|e| CredentialsError::Format {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        let tmp = path.with_extension("toml.new");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?;
            f.write_all(text.as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        if let Ok(meta) = std::fs::metadata(dir) {
            use std::os::unix::fs::MetadataExt;
            // Only root can give a file away; for anyone else it is theirs already.
            let _ = std::os::unix::fs::chown(&tmp, Some(meta.uid()), Some(meta.gid()));
        }
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// True if `name` has an entry.
    pub fn contains(&self, name: &str) -> bool {
        self.clients.contains_key(name)
    }

    /// Adds `name` with a new random secret and returns the secret (shown once, never stored).
    pub fn add(&mut self, name: &str, role: Role) -> Result<String, CredentialsError> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(CredentialsError::BadName(name.to_owned()));
        }
        if self.contains(name) {
            return Err(CredentialsError::Exists(name.to_owned()));
        }
        let mut raw = [0u8; 16];
        getrandom::fill(&mut raw).map_err(|e| CredentialsError::Secret(e.to_string()))?;
        let secret: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let hash = hasher()?
            .hash_password(secret.as_bytes())
            .map_err(|e| CredentialsError::Secret(e.to_string()))?
            .to_string();
        let created = crate::alert::rfc3339(crate::alert::now_millis());
        self.clients.insert(
            name.to_owned(),
            Entry {
                role,
                secret: hash,
                created,
            },
        );
        Ok(secret)
    }

    /// Removes `name`; returns whether it was there.
    pub fn remove(&mut self, name: &str) -> bool {
        self.clients.remove(name).is_some()
    }

    /// The role of `name` if `secret` is its secret. Slow on purpose (argon2id): call it off
    /// the async workers.
    pub fn verify(&self, name: &str, secret: &[u8]) -> Option<Role> {
        let entry = self.clients.get(name)?;
        let hash = PasswordHash::new(&entry.secret).ok()?;
        Argon2::default()
            .verify_password(secret, &hash)
            .ok()
            .map(|_| entry.role)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(name: &str) -> Identity {
        Identity::Named {
            name: name.into(),
            role: Role::Device,
        }
    }

    #[test]
    fn client_ids_belong_to_their_names() {
        let mut creds = Credentials::default();
        creds.clients.insert(
            "boiler-1".into(),
            Entry {
                role: Role::Device,
                secret: String::new(),
                created: String::new(),
            },
        );
        assert!(may_use_client_id(&device("boiler-1"), "boiler-1", &creds));
        assert!(may_use_client_id(
            &device("boiler-1"),
            "boiler-1@spare",
            &creds
        ));
        assert!(!may_use_client_id(&device("boiler"), "boiler-1", &creds));
        assert!(!may_use_client_id(&device("boiler-1"), "boiler-10", &creds));
        assert!(!may_use_client_id(&Identity::Anonymous, "boiler-1", &creds));
        assert!(!may_use_client_id(
            &Identity::Anonymous,
            "boiler-1@x",
            &creds
        ));
        assert!(may_use_client_id(&Identity::Anonymous, "dashboard", &creds));
    }

    #[test]
    fn secrets_are_shown_once_stored_hashed_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds.toml");
        let mut creds = Credentials::load(&path).unwrap();
        let secret = creds.add("boiler-1", Role::Device).unwrap();
        assert_eq!(secret.len(), 32);
        assert!(matches!(
            creds.add("boiler-1", Role::Device),
            Err(CredentialsError::Exists(_))
        ));
        assert!(matches!(
            creds.add("a/b", Role::Device),
            Err(CredentialsError::BadName(_))
        ));
        creds.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&secret), "the secret itself is never stored");
        assert!(text.contains("$argon2id$"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        let loaded = Credentials::load(&path).unwrap();
        assert_eq!(
            loaded.verify("boiler-1", secret.as_bytes()),
            Some(Role::Device)
        );
        assert_eq!(loaded.verify("boiler-1", b"guess"), None);
        assert_eq!(loaded.verify("nobody", secret.as_bytes()), None);
        let mut again = loaded;
        assert!(again.remove("boiler-1"));
        assert!(!again.remove("boiler-1"));
    }
}
